"""HTTP endpoints of OpenAI's Responses API: ``POST /v1/responses`` (through the shared
``generate`` route, so it parses, leases and streams as chat does) and the stored
responses' ``GET`` / ``DELETE /v1/responses/{id}`` and ``GET .../input_items``."""

from __future__ import annotations

import re
from typing import Any

import anyio.to_thread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ggufserve.api.responses_wire import DeletedResponse, InputItemList, ResponsesRequest
from ggufserve.api.routes import generate
from ggufserve.errors import InvalidRequestError, NotFoundError
from ggufserve.generation.chat import ChatService
from ggufserve.generation.response_store import ResponseStore, StoredResponse
from ggufserve.generation.responses import ResponsesService
from ggufserve.settings import ServerSettings
from ggufserve.store.model_store import default_home

STORE_FILE = "responses.sqlite3"
# input_items pages: OpenAI's default and largest page sizes.
DEFAULT_PAGE = 20
MAX_PAGE = 100
LIMIT = re.compile(r"[0-9]{1,3}")


def install(app: Starlette, settings: ServerSettings, chat: ChatService) -> ResponseStore:
    """Give the app its response store (``$GGUFSERVE_HOME/responses.sqlite3``, opened on
    first use) and Responses service, as ``app.state.response_store`` and
    ``app.state.responses``; the caller closes the store at shutdown."""
    store = ResponseStore(
        default_home() / STORE_FILE, settings.max_stored_responses, settings.stored_response_ttl_s
    )
    app.state.response_store = store
    app.state.responses = ResponsesService(chat, store)
    return store


async def create_response(request: Request) -> Response:
    return await generate(request, request.app.state.responses, ResponsesRequest)


async def _stored(request: Request) -> tuple[str, StoredResponse]:
    """The stored response the path names.

    Raises:
        NotFoundError: none with that id (unknown, deleted, expired or not stored).
    """
    response_id = request.path_params["response_id"]
    store: ResponseStore = request.app.state.response_store
    stored = await anyio.to_thread.run_sync(store.get, response_id)
    if stored is None:
        raise _not_found(response_id)
    return response_id, stored


def _not_found(response_id: str) -> NotFoundError:
    return NotFoundError(
        f"Response with id '{response_id[:100]}' not found (unknown, deleted, expired, or "
        "created with store: false).",
        param="response_id",
    )


async def retrieve_response(request: Request) -> Response:
    """``GET /v1/responses/{id}``: the stored response.

    Raises:
        InvalidRequestError: ``stream=true`` (replaying a response's events).
        NotFoundError: see :func:`_stored`.
    """
    if request.query_params.get("stream", "false").lower() not in ("false", "0"):
        raise InvalidRequestError(
            "Streaming a stored response again is not supported.", param="stream"
        )
    _, stored = await _stored(request)
    # A stored response may hold megabytes (long instructions, tools): encoded off the loop.
    return await anyio.to_thread.run_sync(JSONResponse, stored.response)


async def delete_response(request: Request) -> Response:
    """``DELETE /v1/responses/{id}``: ``{"id", "object": "response", "deleted": true}``.

    Raises:
        NotFoundError: no stored response with that id.
    """
    response_id = request.path_params["response_id"]
    store: ResponseStore = request.app.state.response_store
    if not await anyio.to_thread.run_sync(store.delete, response_id):
        raise _not_found(response_id)
    return JSONResponse(DeletedResponse(id=response_id).model_dump(mode="json"))


async def list_input_items(request: Request) -> Response:
    """``GET /v1/responses/{id}/input_items``: one page of the response's own input items
    (``order`` ``desc`` by default or ``asc``; ``limit`` 1-100, default 20; ``after``
    an item id).

    Raises:
        InvalidRequestError: a bad ``order``, ``limit`` or ``after``.
        NotFoundError: no stored response with that id.
    """
    query = request.query_params
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequestError("order must be 'asc' or 'desc'.", param="order")
    limit_text = query.get("limit", str(DEFAULT_PAGE))
    # ASCII digits only: str.isdigit() takes '²' and int() refuses 5,000-digit strings.
    if not LIMIT.fullmatch(limit_text) or not 1 <= int(limit_text) <= MAX_PAGE:
        raise InvalidRequestError(f"limit must be an integer from 1 to {MAX_PAGE}.", param="limit")
    _, stored = await _stored(request)
    # Items may hold megabytes (data-URL images): paged and encoded off the event loop.
    return await anyio.to_thread.run_sync(
        _page, stored.input_items, order, query.get("after"), int(limit_text)
    )


def _page(items: list[dict[str, Any]], order: str, after: str | None, limit: int) -> JSONResponse:
    """One page of ``items`` (in ``order``, after the item ``after``) as the response.

    Raises:
        InvalidRequestError: no item has the id ``after``.
    """
    items = items[::-1] if order == "desc" else list(items)
    if after is not None:
        ids = [item.get("id") for item in items]
        if after not in ids:
            raise InvalidRequestError(
                f"No input item '{after[:100]}' in this response.", param="after"
            )
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    body = InputItemList(
        data=page,
        first_id=page[0]["id"] if page else None,
        last_id=page[-1]["id"] if page else None,
        has_more=len(items) > len(page),
    )
    return JSONResponse(body.model_dump(mode="json"))


routes = [
    Route("/v1/responses", create_response, methods=["POST"]),
    Route("/v1/responses/{response_id}", retrieve_response, methods=["GET"]),
    Route("/v1/responses/{response_id}", delete_response, methods=["DELETE"]),
    Route("/v1/responses/{response_id}/input_items", list_input_items, methods=["GET"]),
]
