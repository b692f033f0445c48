"""The OpenAPI 3.1 document of the HTTP API, served at ``GET /openapi.json``.

Request and response schemas are generated from the pydantic wire models
(``models_json_schema``, components under ``#/components/schemas``), so the document
cannot drift from what the routes validate. Every operation lists the statuses it can
answer with; errors share OpenAI's envelope, except on the Anthropic Messages paths
(``/v1/messages*``: Anthropic's ``{"type": "error", "error": {"type", "message"}}``). Like
vLLM's, the document is behind the API key when one is set (only ``/health`` is open): it
is no secret, but nothing the key protects is served to callers without it.
"""

from __future__ import annotations

import functools
import json
from importlib import metadata
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, RootModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import Response

from ggufserve.api.messages_wire import (
    ContentBlockDeltaEvent,
    ContentBlockStartEvent,
    ContentBlockStopEvent,
    CountTokensRequest,
    Message,
    MessageDeltaEvent,
    MessagesRequest,
    MessageStartEvent,
    MessageStopEvent,
    PingEvent,
    TokenCount,
)
from ggufserve.api.responses_wire import (
    DeletedResponse,
    InputItemList,
    ResponseObject,
    ResponsesRequest,
    StreamEvent,
)
from ggufserve.api.wire import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelList,
)
from ggufserve.generation.embeddings import EmbeddingRequest, EmbeddingResponse

OPENAPI_VERSION = "3.1.0"
REF_TEMPLATE = "#/components/schemas/{model}"


class ErrorDetail(BaseModel):
    """The ``error`` object of OpenAI's error envelope."""

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail


class HealthStatus(BaseModel):
    """``/health``: ``ok`` (200) or ``loading``/``error`` (503), with each start-up model's
    state; further keys may explain a 503."""

    model_config = ConfigDict(extra="allow")

    status: str
    models: dict[str, str]


class AnthropicErrorDetail(BaseModel):
    """The ``error`` object of Anthropic's error body (``type``: ``invalid_request_error``,
    ``authentication_error``, ``not_found_error``, ``request_too_large``,
    ``rate_limit_error``, ``api_error``, ``overloaded_error``)."""

    type: str
    message: str


class AnthropicErrorResponse(BaseModel):
    """Every error body on ``/v1/messages*``: ``{"type": "error", "error": {"type",
    "message"}, "request_id"}``."""

    type: Literal["error"]
    error: AnthropicErrorDetail
    request_id: str | None = None


class ResponseStreamEvent(RootModel[StreamEvent]):
    """One event of a ``/v1/responses`` stream; its ``type`` is the SSE ``event:`` name."""


class MessageStreamEvent(
    RootModel[
        MessageStartEvent
        | PingEvent
        | ContentBlockStartEvent
        | ContentBlockDeltaEvent
        | ContentBlockStopEvent
        | MessageDeltaEvent
        | MessageStopEvent
    ]
):
    """One event of a ``/v1/messages`` stream; its ``type`` is the SSE ``event:`` name."""


_MODELS: list[type[BaseModel]] = [
    ChatCompletionRequest,
    ChatCompletion,
    ChatCompletionChunk,
    CompletionRequest,
    Completion,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelList,
    ErrorResponse,
    HealthStatus,
    ResponsesRequest,
    ResponseObject,
    ResponseStreamEvent,
    DeletedResponse,
    InputItemList,
    MessagesRequest,
    Message,
    MessageStreamEvent,
    CountTokensRequest,
    TokenCount,
    AnthropicErrorResponse,
]

# Status → when, for the errors each kind of operation can answer with.
_AUTH = {"401": "API key missing or wrong (only when the server runs with --api-key)."}
_REQUEST_ERRORS = {
    "400": "Invalid request; `param` names the field at fault.",
    **_AUTH,
    "404": "Unknown model (`model_not_found`).",
    "413": "Body larger than --max-request-bytes.",
    "415": "Content-Type is not JSON.",
    "429": "The model's queue is full (`Retry-After`).",
    "500": "Unexpected failure (the message carries a request id only).",
    "503": "Model loading, failed to load, out of memory budget, or server draining.",
}
_RESPONSES_ERRORS = {
    **_REQUEST_ERRORS,
    "404": "Unknown model (`model_not_found`) or `previous_response_id` (not stored).",
}
_STORED_ERRORS = {**_AUTH, "404": "No stored response with that id (unknown, deleted, expired)."}
# Anthropic's statuses (the body's error.type follows the status).
_MESSAGES_ERRORS = {
    "400": "Invalid request (`invalid_request_error`).",
    "401": "API key missing or wrong (`authentication_error`; `x-api-key` or Bearer).",
    "404": "Unknown model (`not_found_error`).",
    "413": "Body larger than --max-request-bytes (`request_too_large`).",
    "415": "Content-Type is not JSON (`invalid_request_error`).",
    "429": "The model's queue is full (`rate_limit_error`, `Retry-After`).",
    "500": "Unexpected failure (`api_error`; the message carries a request id only).",
    "503": "Model loading, out of memory budget, or server draining (`overloaded_error`).",
}
_MESSAGES_SECURITY: list[dict[str, list[str]]] = [{"bearer": []}, {"x-api-key": []}]
_TYPED_SSE_DESCRIPTION = (
    "With `stream: true`: typed server-sent events (`event:` is the payload's `type`, "
    "`data` its JSON) and no `[DONE]`."
)
_SSE_DESCRIPTION = (
    "With `stream: true`: one server-sent event per chunk (`data` holds its JSON), an "
    "error event (`data` holds an ErrorResponse) if the generation fails after the first "
    "byte, then `data: [DONE]`."
)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF_TEMPLATE.format(model=name)}


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(name)}}


def _errors(statuses: dict[str, str], schema: str = "ErrorResponse") -> dict[str, Any]:
    return {
        status: {"description": why, "content": _json(schema)} for status, why in statuses.items()
    }


def _event(chunk: str) -> dict[str, Any]:
    """One server-sent event (OpenAPI 3.1 describes each event of a stream)."""
    payload = {"anyOf": [_ref(chunk), _ref("ErrorResponse")]}
    json_data = {"type": "string", "contentMediaType": "application/json", "contentSchema": payload}
    data = {"anyOf": [{"const": "[DONE]"}, json_data]}
    return {
        "type": "object",
        "description": _SSE_DESCRIPTION,
        "properties": {"data": data, "event": {"type": "string"}, "id": {"type": "string"}},
        "required": ["data"],
    }


def _typed_event(event: str, error: str | None) -> dict[str, Any]:
    """One typed server-sent event (Responses, Messages): ``event`` names the payload's
    type, ``data`` holds an ``event`` (or, after a failure, an ``error``) as JSON."""
    payload = _ref(event) if error is None else {"anyOf": [_ref(event), _ref(error)]}
    json_data = {"type": "string", "contentMediaType": "application/json", "contentSchema": payload}
    return {
        "type": "object",
        "description": _TYPED_SSE_DESCRIPTION,
        "properties": {"event": {"type": "string"}, "data": json_data},
        "required": ["event", "data"],
    }


def _post(
    summary: str,
    request: str,
    reply: str,
    chunk: str | None,
    *,
    stream: dict[str, Any] | None = None,
    errors: dict[str, str] = _REQUEST_ERRORS,
    error_schema: str = "ErrorResponse",
) -> dict[str, Any]:
    content = _json(reply)
    if chunk is not None:
        content["text/event-stream"] = {"schema": _event(chunk)}
    if stream is not None:
        content["text/event-stream"] = {"schema": stream}
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": _json(request)},
            "responses": {
                "200": {"description": "OK", "content": content},
                **_errors(errors, error_schema),
            },
        }
    }


def _messages_post(summary: str, request: str, reply: str, stream: bool) -> dict[str, Any]:
    """An Anthropic Messages operation: Anthropic's errors, ``x-api-key`` or Bearer."""
    events = _typed_event("MessageStreamEvent", "AnthropicErrorResponse") if stream else None
    item = _post(
        summary,
        request,
        reply,
        None,
        stream=events,
        errors=_MESSAGES_ERRORS,
        error_schema="AnthropicErrorResponse",
    )
    item["post"]["security"] = _MESSAGES_SECURITY
    return item


_RESPONSE_ID = {
    "name": "response_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "A stored response's id (`resp_...`).",
}


def _responses_paths() -> dict[str, Any]:
    """The Responses API's operations: create, retrieve, delete, list input items."""
    retrieve = _get("A stored response", _json("ResponseObject"), _STORED_ERRORS)
    retrieve["get"]["responses"]["400"] = {
        "description": "`stream=true` (replaying a stored response is not supported).",
        "content": _json("ErrorResponse"),
    }
    retrieve["get"]["parameters"] = [
        {"name": "stream", "in": "query", "required": False, "schema": {"type": "string"}}
    ]
    delete = {
        "delete": {
            "summary": "Forget a stored response",
            "responses": {
                "200": {"description": "OK", "content": _json("DeletedResponse")},
                **_errors(_STORED_ERRORS),
            },
        }
    }
    items = _get("A stored response's input items", _json("InputItemList"), _STORED_ERRORS)
    items["get"]["responses"]["400"] = {
        "description": "A bad `order`, `limit` or `after`.",
        "content": _json("ErrorResponse"),
    }
    items["get"]["parameters"] = [
        {
            "name": "order",
            "in": "query",
            "required": False,
            "schema": {"type": "string", "enum": ["asc", "desc"]},
        },
        {
            "name": "limit",
            "in": "query",
            "required": False,
            "schema": {"type": "integer", "minimum": 1, "maximum": 100},
        },
        {"name": "after", "in": "query", "required": False, "schema": {"type": "string"}},
    ]
    return {
        "/v1/responses": _post(
            "Response (OpenAI Responses API)",
            "ResponsesRequest",
            "ResponseObject",
            None,
            stream=_typed_event("ResponseStreamEvent", None),
            errors=_RESPONSES_ERRORS,
        ),
        "/v1/responses/{response_id}": {
            "parameters": [_RESPONSE_ID],
            **retrieve,
            **delete,
        },
        "/v1/responses/{response_id}/input_items": {"parameters": [_RESPONSE_ID], **items},
    }


def _get(summary: str, content: dict[str, Any], errors: dict[str, str]) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "responses": {"200": {"description": "OK", "content": content}, **_errors(errors)},
        }
    }


def _paths() -> dict[str, Any]:
    health = _get("Liveness of the start-up models", _json("HealthStatus"), {})
    health["get"]["security"] = []
    health["get"]["responses"]["503"] = {
        "description": "A start-up model is loading, or every one failed.",
        "content": _json("HealthStatus"),
    }
    return {
        "/v1/chat/completions": _post(
            "Chat completion", "ChatCompletionRequest", "ChatCompletion", "ChatCompletionChunk"
        ),
        "/v1/completions": _post(
            "Text completion", "CompletionRequest", "Completion", "Completion"
        ),
        "/v1/embeddings": _post("Embeddings", "EmbeddingRequest", "EmbeddingResponse", None),
        **_responses_paths(),
        "/v1/messages": _messages_post(
            "Message (Anthropic Messages API)", "MessagesRequest", "Message", stream=True
        ),
        "/v1/messages/count_tokens": _messages_post(
            "Prompt tokens of a Messages request", "CountTokensRequest", "TokenCount", stream=False
        ),
        "/v1/models": _get("Servable models and their load state", _json("ModelList"), _AUTH),
        "/health": health,
        "/metrics": _get(
            "Prometheus metrics", {"text/plain": {"schema": {"type": "string"}}}, _AUTH
        ),
        "/openapi.json": _get(
            "This document", {"application/json": {"schema": {"type": "object"}}}, _AUTH
        ),
    }


def build_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document as a JSON-ready dict (schemas in pydantic's validation
    mode: what a request may send, what a reply may hold)."""
    _, schemas = models_json_schema(
        [(model, "validation") for model in _MODELS], ref_template=REF_TEMPLATE
    )
    _any_of_open_unions(schemas)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "ggufserve",
            "version": _version(),
            "description": "OpenAI-compatible API for GGUF models on llama.cpp.",
        },
        "paths": _paths(),
        "components": {
            "schemas": schemas["$defs"],
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The --api-key value (required only when one is set).",
                },
                "x-api-key": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "x-api-key",
                    "description": "The --api-key value, as Anthropic's clients send it.",
                },
            },
        },
        "security": [{"bearer": []}],
    }


def _any_of_open_unions(node: Any) -> None:
    """Unions picked by a callable discriminator (known kinds, else an ``Other*`` model
    that takes any ``type``) overlap: ``anyOf``, not ``oneOf`` (which would refuse a known
    kind for matching two branches). Unions with a ``discriminator`` mapping stay."""
    if isinstance(node, dict):
        if "oneOf" in node and "discriminator" not in node:
            node["anyOf"] = node.pop("oneOf")
        for value in node.values():
            _any_of_open_unions(value)
    elif isinstance(node, list):
        for value in node:
            _any_of_open_unions(value)


def _version() -> str:
    try:
        return metadata.version("ggufserve")
    except metadata.PackageNotFoundError:
        return "0.0.0"


@functools.cache
def document_bytes() -> bytes:
    """The document serialized once per process (it depends on code only)."""
    return json.dumps(build_document(), separators=(",", ":")).encode()


async def openapi_document(request: Request) -> Response:
    """``GET /openapi.json``."""
    return Response(document_bytes(), media_type="application/json")
