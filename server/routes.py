"""Thin HTTP endpoints: parse → service → JSON or SSE."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive

from server.chat import ChatService
from server.errors import InvalidRequestError, PayloadTooLargeError, UnsupportedMediaTypeError
from server.metrics import metrics
from server.protocol import ChatCompletionRequest, ModelCard, ModelList
from server.registry import ModelRegistry, ModelState

T = TypeVar("T")

JSON_TYPES = ("application/json", "text/json")


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused while reading once it passes ``max_bytes``.

    Raises:
        UnsupportedMediaTypeError: a Content-Type that is not JSON.
        PayloadTooLargeError: the body (declared or read) exceeds ``max_bytes``.
    """
    media_type = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if media_type.lower() not in JSON_TYPES and not media_type.lower().endswith("+json"):
        raise UnsupportedMediaTypeError(
            f"Content-Type '{media_type[:64]}' is not supported; send 'application/json'."
        )
    too_large = PayloadTooLargeError(f"The request body exceeds {max_bytes} bytes.")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise too_large
    return bytes(body)


def parse_chat_request(raw: bytes) -> ChatCompletionRequest:
    """Validate the JSON body.

    Raises:
        InvalidRequestError: malformed JSON, or the first failing field with its path.
    """
    try:
        return ChatCompletionRequest.model_validate_json(raw)
    except ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]
        if error["type"] == "json_invalid":
            raise InvalidRequestError("The request body is not valid JSON.") from None
        param = ".".join(str(part) for part in error["loc"]) or None
        where = f"'{param}': " if param else ""
        raise InvalidRequestError(f"Invalid request: {where}{error['msg']}.", param=param) from None


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def run_unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Await ``work``; cancel it and return None if the client goes away first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        return None
    return task.result()


async def chat_completions(request: Request) -> Response:
    state = request.app.state
    request_id: str = request.state.request_id
    raw = await read_body(request, state.settings.max_request_bytes)
    body = parse_chat_request(raw)
    service: ChatService = state.chat
    prepared = await service.prepare(body, request_id)
    generation = service.start(prepared)
    if body.stream:
        return StreamingResponse(
            service.stream(prepared, generation, request_id),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    completion = await run_unless_disconnected(
        request, service.complete(prepared, generation, request_id)
    )
    if completion is None:
        return Response(status_code=499)
    return JSONResponse(completion.model_dump(mode="json"))


async def list_models(request: Request) -> Response:
    registry: ModelRegistry = request.app.state.registry
    cards = [
        ModelCard(
            id=m.id,
            created=m.created,
            capabilities=["completion", "vision"] if m.entry.mmproj else ["completion"],
        )
        for m in registry.models()
    ]
    return JSONResponse(ModelList(data=cards).model_dump(mode="json"))


async def health(request: Request) -> Response:
    """200 once every model has finished loading and one is ready; 503 before that."""
    registry: ModelRegistry = request.app.state.registry
    states = {m.id: m.state.value for m in registry.models()}
    values = set(states.values())
    if ModelState.LOADING.value in values:
        return JSONResponse({"status": "loading", "models": states}, status_code=503)
    if ModelState.READY.value in values:
        return JSONResponse({"status": "ok", "models": states})
    return JSONResponse({"status": "error", "models": states}, status_code=503)


routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
