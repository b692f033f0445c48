"""Thin HTTP endpoints: parse → service → JSON or SSE."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import anyio.to_thread
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ggufserve.api.messages_wire import MessagesRequest
from ggufserve.api.metrics import metrics
from ggufserve.api.openapi import openapi_document
from ggufserve.api.responses_wire import ResponsesRequest
from ggufserve.api.wire import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from ggufserve.engine.worker import Generation
from ggufserve.errors import (
    APIError,
    InvalidRequestError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from ggufserve.generation.embeddings import EmbeddingRequest
from ggufserve.generation.requests import (
    GenerationService,
    create_embeddings,
    start_generation,
)
from ggufserve.generation.streaming import SSE_HEADERS, SSE_MEDIA_TYPE
from ggufserve.models.registry import Lease, ModelRegistry, ModelState, ServedModel

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

JSON_TYPES = ("application/json", "text/json")
# Slices of a body whose JSON values are counted between two GIL hand-overs: 1 MiB.
COUNT_SLICE_BYTES = 1 << 20


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


async def parse_body(raw: bytes, model: type[M], max_json_values: int) -> M:
    """Validate a JSON body in a worker thread, once its value count is known to be bounded
    (pydantic holds the GIL while it parses: ~1 us per value, which would stall the loop).

    Raises:
        PayloadTooLargeError: more than ``max_json_values`` values (see :func:`check_values`).
        InvalidRequestError: see :func:`parse_request`.
    """

    def parse() -> M:
        check_values(raw, max_json_values)
        return parse_request(raw, model)

    return await anyio.to_thread.run_sync(parse)


def check_values(raw: bytes, max_json_values: int) -> None:
    """Bound the values of a JSON document from above by its commas, ``{`` and ``[``
    (strings' count too, so prose costs a little of the budget), counted slice by slice.

    Raises:
        PayloadTooLargeError: the count exceeds ``max_json_values``.
    """
    count = 0
    for start in range(0, len(raw), COUNT_SLICE_BYTES):
        part = raw[start : start + COUNT_SLICE_BYTES]
        count += part.count(b",") + part.count(b"{") + part.count(b"[")
        if count > max_json_values:
            raise PayloadTooLargeError(
                f"The request body holds more than {max_json_values} JSON values."
            )


def parse_request(raw: bytes, model: type[M]) -> M:
    """Validate the JSON body against a request model.

    Raises:
        InvalidRequestError: malformed JSON, or the first failing field with its path.
    """
    try:
        return model.model_validate_json(raw)
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
        # Wait for the cancellation to finish (it cancels the engine jobs) before the
        # caller releases the model's lease: a keep_alive 0 unload must not race the jobs.
        with contextlib.suppress(asyncio.CancelledError, APIError):  # nobody reads it
            await task
        return None
    return task.result()


async def generate(
    request: Request,
    service: GenerationService[Any, Any],
    model: (
        type[ChatCompletionRequest]
        | type[CompletionRequest]
        | type[MessagesRequest]
        | type[ResponsesRequest]
    ),
) -> Response:
    """Parse → model-free checks → lease the model (loading it if needed) → prepare →
    queue → JSON or SSE, for chat and text completions. A request the checks refuse never
    waits for a load. The lease ends with the response (for a stream, once its last byte
    is sent or the client has gone)."""
    request_id: str = request.state.request_id
    settings = request.app.state.settings
    raw = await read_body(request, settings.max_request_bytes)
    body = await parse_body(raw, model, settings.max_json_values)
    running = await start_generation(request.app.state.registry, service, body, request_id)
    if body.stream:
        stream = LeasedStream(running.sse())
        stream.hold(running.lease, running.generations)
        return stream
    try:
        completion = await run_unless_disconnected(request, running.complete())
    finally:
        running.close()
    return json_or_gone(completion)


async def chat_completions(request: Request) -> Response:
    return await generate(request, request.app.state.chat, ChatCompletionRequest)


async def completions(request: Request) -> Response:
    return await generate(request, request.app.state.completions, CompletionRequest)


async def embeddings(request: Request) -> Response:
    state = request.app.state
    raw = await read_body(request, state.settings.max_request_bytes)
    body = await parse_body(raw, EmbeddingRequest, state.settings.max_json_values)
    response = await create_embeddings(state.registry, state.embeddings, body)
    # Thousands of vectors take tens of milliseconds to serialise: off the loop.
    content = await anyio.to_thread.run_sync(response.model_dump_json)
    return Response(content, media_type="application/json")


class LeasedStream(StreamingResponse):
    """An SSE response that holds its model's lease until the response has ended (sent,
    failed or abandoned by the client), then cancels its generations (a no-op for those
    that finished) and releases the lease, even if the body was never iterated."""

    def __init__(self, events: AsyncIterator[str]):
        super().__init__(
            events,
            media_type=SSE_MEDIA_TYPE,
            headers=SSE_HEADERS,
        )
        self._lease: Lease | None = None
        self._generations: list[Generation] = []

    def hold(self, lease: Lease, generations: list[Generation]) -> None:
        self._lease, self._generations = lease, generations

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for generation in self._generations:
                generation.cancel()
            if self._lease is not None:
                self._lease.release()


def json_or_gone(body: BaseModel | None) -> Response:
    """The response body as JSON, or 499 when the client went away first."""
    if body is None:
        return Response(status_code=499)
    return JSONResponse(body.model_dump(mode="json"))


async def list_models(request: Request) -> Response:
    """Every servable model (``models.yaml``'s, then the store's) with its load state."""
    registry: ModelRegistry = request.app.state.registry
    models = registry.models()
    with registry.lock:
        cards = [model_card(m) for m in models]
    return JSONResponse(ModelList(data=cards).model_dump(mode="json"))


def model_card(served: ServedModel) -> ModelCard:
    idle_s = served.idle_s()
    return ModelCard(
        id=served.id,
        created=served.created,
        capabilities=capabilities(served),
        state=served.state.value,
        memory_bytes=served.memory_bytes,
        expires_at=served.expires_at(),
        idle_s=None if idle_s is None else round(idle_s, 3),
        in_flight=served.in_flight,
        keep_alive_s=served.keep_alive_s,
        load_progress=served.load_progress if served.state.value == "loading" else None,
    )


async def health(request: Request) -> Response:
    """The start-up (``--model``) models: 503 ``loading`` until each one's first load has
    ended, then 200 ``ok`` while one of them can serve (ready, or loadable again after
    an unload) or when there are none, 503 ``error`` when all of them failed. Other
    models affect it only when stalled: 503 ``stalled`` with a ``reason`` while any loaded
    model's scheduler step has run longer than ``max_step_s`` (an orchestrator restarts)."""
    registry: ModelRegistry = request.app.state.registry
    startup = registry.startup_models()
    states = {m.id: m.state.value for m in startup}
    if not all(m.settled for m in startup):
        return JSONResponse({"status": "loading", "models": states}, status_code=503)
    stalled = stalled_reason(registry, request.app.state.settings.max_step_s)
    if stalled is not None:
        body = {"status": "stalled", "models": states, "reason": stalled}
        return JSONResponse(body, status_code=503)
    if not startup or any(m.state is not ModelState.FAILED for m in startup):
        return JSONResponse({"status": "ok", "models": states})
    return JSONResponse({"status": "error", "models": states}, status_code=503)


def stalled_reason(registry: ModelRegistry, max_step_s: float) -> str | None:
    """Why the server is stalled (a loaded model whose current scheduler step has run
    longer than ``max_step_s`` seconds), or None."""
    for served in registry.loaded():
        parts = served.parts
        age_s = parts.engine.step_clock.age_s() if parts is not None else 0.0
        if age_s > max_step_s:
            return (
                f"model '{served.id}': a scheduler step has run {age_s:.1f} s "
                f"(limit {max_step_s:g} s)"
            )
    return None


def capabilities(served: ServedModel) -> list[Any]:
    """What a model offers, named as Ollama names it (tools only once loaded: the family
    is known from the GGUF)."""
    out: list[Any] = ["completion"]
    if served.entry.mmproj:
        out.append("vision")
    if served.serves_tools:
        out.append("tools")
    if served.entry.embeddings:
        out.append("embedding")
    return out


routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/embeddings", embeddings, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/openapi.json", openapi_document, methods=["GET"]),
]
