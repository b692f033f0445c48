"""``create_app``: routes, middleware, OpenAI-envelope exception handlers and lifespan."""

from __future__ import annotations

import contextlib
import hmac
import logging
import uuid
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ggufserve.api.http_limits import HeaderCountMiddleware
from ggufserve.api.messages_routes import routes as messages_routes
from ggufserve.api.messages_wire import error_body, is_messages_path
from ggufserve.api.metrics import metrics_registry
from ggufserve.api.responses_routes import install as install_responses
from ggufserve.api.responses_routes import routes as responses_routes
from ggufserve.api.routes import routes
from ggufserve.api.web_page import is_open_path, web_routes
from ggufserve.errors import (
    APIError,
    AuthenticationError,
    InternalServerError,
    MethodNotAllowedError,
    NotFoundError,
)
from ggufserve.generation.chat import ChatService
from ggufserve.generation.completions import CompletionService
from ggufserve.generation.embeddings import EmbeddingService
from ggufserve.models.heap import settle_heap
from ggufserve.models.registry import ModelRegistry
from ggufserve.settings import ServerSettings

log = logging.getLogger(__name__)

# Paths answered without an API key (load balancers and orchestrators probe them).
OPEN_PATHS = frozenset({"/health"})


def error_response(error: APIError, path: str = "", request_id: str | None = None) -> JSONResponse:
    """The error's response: Anthropic's error body on ``/v1/messages*`` paths, else
    OpenAI's envelope."""
    body = error_body(error, request_id) if is_messages_path(path) else error.envelope()
    return JSONResponse(body, status_code=error.status_code, headers=error.headers())


class RequestContextMiddleware:
    """Give each request an id (``X-Request-ID``) and enforce the API key if one is set.

    Pure ASGI (not ``BaseHTTPMiddleware``) so streaming bodies pass through untouched.
    """

    def __init__(self, app: ASGIApp, api_key: str | None, webui: bool = False):
        self.app = app
        self.api_key = api_key
        # The chat page and its assets load without a key (the page then asks for it).
        self.webui = webui

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        if self.api_key and not self._open(scope["path"]) and not self._authorized(scope):
            response = error_response(
                AuthenticationError(
                    "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>' "
                    "or 'x-api-key: <key>'.",
                    code="invalid_api_key",
                ),
                scope["path"],
                request_id,
            )
            await response(scope, receive, send_with_id)
            return
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # Details go to the log only; the client gets a generic 500 with the request id.
            log.exception("request %s failed", request_id)
            if started:
                raise
            response = error_response(InternalServerError(request_id), scope["path"], request_id)
            await response(scope, receive, send_with_id)

    def _open(self, path: str) -> bool:
        return path in OPEN_PATHS or (self.webui and is_open_path(path))

    def _authorized(self, scope: Scope) -> bool:
        assert self.api_key is not None
        headers = dict(scope["headers"])
        header = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":  # Anthropic's clients send the key as x-api-key
            token = headers.get(b"x-api-key", b"").decode("latin-1")
        return bool(token) and hmac.compare_digest(token.strip().encode(), self.api_key.encode())


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return error_response(exc, request.url.path, request.state.request_id)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error = APIError(str(exc.detail)[:200])
    if exc.status_code == 405:
        error = MethodNotAllowedError(f"Method {request.method} not allowed here.")
    if exc.status_code == 404:
        error = NotFoundError(f"No route {request.url.path[:200]}.")
    return error_response(error, request.url.path, request.state.request_id)


async def _client_gone(request: Request, exc: Exception) -> Response:
    # The client left (or was cut off by a read deadline) mid-body: nobody reads the answer.
    return Response(status_code=499)


def create_app(settings: ServerSettings, registry: ModelRegistry) -> Starlette:
    """Build the ASGI app. Models start loading in the lifespan and are freed at shutdown.

    Args:
        settings: Server settings (API key, limits, CORS origins).
        registry: The models to serve (not yet loaded).
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        settle_heap()  # imports and app objects: out of every later collection
        registry.start_loading()
        try:
            yield
        finally:
            registry.close()
            app.state.response_store.close()

    middleware = [
        Middleware(RequestContextMiddleware, api_key=settings.api_key, webui=settings.webui)
    ]
    if settings.cors_allow_origins:
        middleware.insert(
            0,
            Middleware(
                CORSMiddleware,
                allow_origins=settings.cors_allow_origins,
                allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
                allow_headers=[
                    "authorization",
                    "content-type",
                    "x-api-key",
                    "anthropic-version",
                    "anthropic-beta",
                ],
            ),
        )
    # Outermost: a request with too many headers reaches nothing else.
    middleware.insert(
        0, Middleware(HeaderCountMiddleware, max_header_count=settings.max_header_count)
    )
    app = Starlette(
        routes=[
            *routes,
            *messages_routes,
            *responses_routes,
            *(web_routes() if settings.webui else []),
        ],
        middleware=middleware,
        exception_handlers={
            APIError: _api_error,
            HTTPException: _http_error,
            ClientDisconnect: _client_gone,
        },
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.registry = registry
    app.state.chat = ChatService(settings)
    install_responses(app, settings, app.state.chat)
    app.state.completions = CompletionService(settings)
    app.state.embeddings = EmbeddingService(
        settings.max_embedding_inputs, settings.max_embedding_chars
    )
    app.state.metrics = metrics_registry(registry)
    return app
