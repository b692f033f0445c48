"""The OpenAPI 3.1 document of the HTTP API, served at ``GET /openapi.json``.

Request and response schemas are generated from the pydantic wire models
(``models_json_schema``, components under ``#/components/schemas``), so the document
cannot drift from what the routes validate. Every operation lists the statuses it can
answer with; errors share OpenAI's envelope. Like vLLM's, the document is behind the API
key when one is set (only ``/health`` is open): it is no secret, but nothing the key
protects is served to callers without it.
"""

from __future__ import annotations

import functools
import json
from importlib import metadata
from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import Response

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
_SSE_DESCRIPTION = (
    "With `stream: true`: one server-sent event per chunk (`data` holds its JSON), an "
    "error event (`data` holds an ErrorResponse) if the generation fails after the first "
    "byte, then `data: [DONE]`."
)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF_TEMPLATE.format(model=name)}


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(name)}}


def _errors(statuses: dict[str, str]) -> dict[str, Any]:
    return {
        status: {"description": why, "content": _json("ErrorResponse")}
        for status, why in statuses.items()
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


def _post(summary: str, request: str, reply: str, chunk: str | None) -> dict[str, Any]:
    content = _json(reply)
    if chunk is not None:
        content["text/event-stream"] = {"schema": _event(chunk)}
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": _json(request)},
            "responses": {
                "200": {"description": "OK", "content": content},
                **_errors(_REQUEST_ERRORS),
            },
        }
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
                }
            },
        },
        "security": [{"bearer": []}],
    }


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
