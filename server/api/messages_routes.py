"""Anthropic Messages endpoints: ``POST /v1/messages`` (through the shared generation
route) and ``POST /v1/messages/count_tokens``. Their errors take Anthropic's shape
(:func:`ggufserve.api.messages_wire.error_body`, applied in :mod:`ggufserve.api.app`)."""

from __future__ import annotations

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ggufserve.api.messages_wire import CountTokensRequest, MessagesRequest, TokenCount
from ggufserve.api.routes import generate, parse_body, read_body
from ggufserve.generation.messages import MessagesService
from ggufserve.models.registry import ModelRegistry


async def create_message(request: Request) -> Response:
    """A reply as Anthropic's message, or (``stream: true``) its event stream."""
    return await generate(request, MessagesService(request.app.state.chat), MessagesRequest)


async def count_tokens(request: Request) -> Response:
    """``{"input_tokens": N}``: the prompt the same ``/v1/messages`` request would decode
    (system, tools, messages and images as the model's template renders them), found by
    preparing it on the model (loaded on demand) without generating.

    Raises:
        ModelNotFoundError: unknown model.
        InvalidRequestError / ContextLengthExceededError: as ``/v1/messages`` would.
        ModelUnavailableError: the model cannot be loaded.
    """
    state = request.app.state
    raw = await read_body(request, state.settings.max_request_bytes)
    body = await parse_body(raw, CountTokensRequest, state.settings.max_json_values)
    registry: ModelRegistry = state.registry
    registry.lookup(body.model)  # an unknown id is a 404 before any other error
    service = MessagesService(state.chat)
    checked = await anyio.to_thread.run_sync(service.check, body)
    lease = await registry.acquire(body.model, body.keep_alive)
    try:
        prepared = await service.prepare(checked, lease, request.state.request_id)
    finally:
        lease.release()
    return JSONResponse(TokenCount(input_tokens=prepared.input_tokens).model_dump())


routes = [
    Route("/v1/messages", create_message, methods=["POST"]),
    Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
]
