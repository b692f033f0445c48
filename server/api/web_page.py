"""The browser chat page: ``GET /`` (``web/index.html``) and its static assets under
``/web/``, served from the package with Starlette's ``FileResponse`` / ``StaticFiles``.

Every page response carries a strict Content-Security-Policy: scripts, styles and
fetches only from this origin, images only from this origin or ``data:``/``blob:`` URIs
(the user's own attachments), no inline script or style, no framing. The page and its
assets are served without an API key (``is_open_path``); the ``/v1`` API stays
protected and the page sends the key itself.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

WEB_DIR = Path(__file__).resolve().parent / "web"
ASSET_PREFIX = "/web/"

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    # Revalidate on each load, so an upgraded server never runs a stale page.
    "cache-control": "no-cache",
}


def is_open_path(path: str) -> bool:
    """Whether ``path`` is the page or one of its assets (served without an API key)."""
    return path == "/" or (path.startswith(ASSET_PREFIX) and ".." not in path)


class SecurityHeaders:
    """ASGI wrapper adding :data:`SECURITY_HEADERS` to every response ``app`` sends,
    replacing any header of the same name."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (name, value)
                    for name, value in message.get("headers", [])
                    if name.decode("latin-1").lower() not in SECURITY_HEADERS
                ]
                headers += [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _index(request: Request) -> Response:
    return FileResponse(
        WEB_DIR / "index.html", media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS
    )


def web_routes() -> list[BaseRoute]:
    """``GET /`` (the page) and ``/web/*`` (its ES modules, CSS and icon)."""
    return [
        Route("/", _index, methods=["GET", "HEAD"]),
        Mount(ASSET_PREFIX.rstrip("/"), app=SecurityHeaders(StaticFiles(directory=WEB_DIR))),
    ]
