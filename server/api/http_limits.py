"""HTTP/1.1 limits uvicorn lacks: read deadlines for a request's headers and body (slow
loris) and a header count bound, on top of uvicorn's h11 protocol.

The header block's size is h11's ``max_incomplete_event_size`` (past it uvicorn answers
400 and closes); the keep-alive timeout is uvicorn's ``timeout_keep_alive``. The body size
cap is the routes' (``max_request_bytes``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import h11
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from ggufserve.errors import APIError

TIMEOUT_BODY = (
    b'{"error":{"message":"Request not received in time.","type":"invalid_request_error"}}'
)
REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(TIMEOUT_BODY), TIMEOUT_BODY)
)


@dataclass(frozen=True)
class ReadDeadlines:
    """Seconds a client has to send a request's headers (from its first byte, or from the
    connection's opening) and then its body (from the end of its headers)."""

    header_timeout_s: float
    body_timeout_s: float


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with read deadlines: a request whose headers or body do not
    arrive in time gets ``408`` (unless its response has started) and the connection is
    closed; the application then sees ``http.disconnect``. uvicorn builds one per
    connection; :meth:`with_deadlines` makes the class it is given.
    """

    deadlines = ReadDeadlines(header_timeout_s=10.0, body_timeout_s=60.0)

    @classmethod
    def with_deadlines(cls, deadlines: ReadDeadlines) -> type[DeadlineH11Protocol]:
        """A subclass bound to ``deadlines`` (uvicorn's ``http`` option takes a class)."""
        return type(cls.__name__, (cls,), {"deadlines": deadlines})

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._reading: Any = None  # h11.IDLE while headers are due, h11.SEND_BODY for a body

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(h11.IDLE)

    def data_received(self, data: bytes) -> None:
        if self._timer is None and self.conn.their_state is h11.IDLE:
            self._arm(h11.IDLE)  # the first bytes of a new request on a kept-alive connection
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
            self._arm(h11.IDLE)  # part of a pipelined request is already buffered
        self._follow()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _follow(self) -> None:
        """Move the deadline along with the client's side of the exchange."""
        state = self.conn.their_state
        if state is h11.SEND_BODY and self._reading is h11.IDLE:
            self._arm(h11.SEND_BODY)
        elif state is not h11.IDLE and state is not h11.SEND_BODY:
            self._disarm()  # the request is complete (or the connection is ending)

    def _arm(self, reading: Any) -> None:
        self._disarm()
        bound = self.deadlines
        delay = bound.header_timeout_s if reading is h11.IDLE else bound.body_timeout_s
        self._reading = reading
        self._timer = self.loop.call_later(delay, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._reading = None, None

    def _expired(self) -> None:
        reading, self._timer, self._reading = self._reading, None, None
        if self.transport.is_closing():
            return
        awaiting_response = self.cycle is None or not self.cycle.response_started
        if reading is h11.IDLE or awaiting_response:
            self.transport.write(REQUEST_TIMEOUT)
        self.transport.close()


class TooManyHeadersError(APIError):
    """431: the request carries more header fields than ``max_header_count``; the
    connection is closed after the answer."""

    status_code = 431
    error_type = "invalid_request_error"

    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}


class HeaderCountMiddleware:
    """Answer 431 (and close) to a request with more than ``max_header_count`` headers,
    before any route runs (their total size is bounded by the protocol already)."""

    def __init__(self, app: ASGIApp, max_header_count: int):
        self.app = app
        self.max_header_count = max_header_count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and len(scope["headers"]) > self.max_header_count:
            error = TooManyHeadersError(
                f"The request has {len(scope['headers'])} header fields; at most "
                f"{self.max_header_count} are allowed."
            )
            response = JSONResponse(error.envelope(), error.status_code, error.headers())
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
