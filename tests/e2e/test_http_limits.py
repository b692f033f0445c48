"""HTTP hardening on a real server, with raw sockets: read deadlines for headers and
bodies (slow loris), header size and count limits; ordinary clients are unaffected."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import API_KEY, RunningServer, model_entry

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 2.0
MAX_HEADER_COUNT = 40
SLACK_S = 1.5  # scheduling and the socket round trip on a busy 2-core machine


@pytest.fixture(scope="module")
def limited(server_factory: Callable[..., RunningServer], bundled_gguf: Path) -> RunningServer:
    return server_factory(
        [model_entry("gemma-3-270m", bundled_gguf)],
        env={
            "GGUFSERVE_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
            "GGUFSERVE_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
            "GGUFSERVE_MAX_HEADER_COUNT": str(MAX_HEADER_COUNT),
        },
    )


def connect(server: RunningServer) -> socket.socket:
    host, port = server.base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def trickle(sock: socket.socket, piece: bytes, *, times: int, interval_s: float) -> None:
    """Send ``piece`` every ``interval_s`` seconds, ``times`` times or until the server
    closes the connection."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        for _ in range(times):
            sock.sendall(piece)
            time.sleep(interval_s)


def request_head(extra: str = "", length: int | None = None) -> bytes:
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
    head += "Content-Type: application/json\r\n"
    if length is not None:
        head += f"Content-Length: {length}\r\n"
    return (head + extra).encode()


def test_headers_that_never_finish_are_cut_off(limited: RunningServer) -> None:
    with connect(limited) as sock:
        started = time.monotonic()
        sock.sendall(request_head())  # no blank line: the headers never end
        answer = read_until_closed(sock)
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert HEADER_TIMEOUT_S - 0.2 <= elapsed <= HEADER_TIMEOUT_S + SLACK_S


def test_trickled_headers_are_cut_off(limited: RunningServer) -> None:
    with connect(limited) as sock:
        started = time.monotonic()
        sock.sendall(request_head())
        trickle(sock, b"X-Slow: 1\r\n", times=100, interval_s=0.1)  # slow loris, forever
        answer = read_until_closed(sock)
        elapsed = time.monotonic() - started
    assert elapsed <= HEADER_TIMEOUT_S + SLACK_S
    assert answer.startswith(b"HTTP/1.1 408 ") or answer == b""


def test_silent_connection_is_closed(limited: RunningServer) -> None:
    with connect(limited) as sock:
        started = time.monotonic()
        answer = read_until_closed(sock)
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert elapsed <= HEADER_TIMEOUT_S + SLACK_S


def test_trickled_body_gets_408(limited: RunningServer) -> None:
    with connect(limited) as sock:
        sock.sendall(request_head("\r\n", length=10_000))
        started = time.monotonic()
        trickle(sock, b" ", times=200, interval_s=0.05)  # 10,000 bytes would take 500 s
        answer = read_until_closed(sock)
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert BODY_TIMEOUT_S - 0.2 <= elapsed <= BODY_TIMEOUT_S + SLACK_S


def refused(answer: bytes) -> bool:
    """A 400/431 status line, or a connection closed without any answer."""
    return answer == b"" or answer.split(b" ", 2)[1] in (b"400", b"431")


def send_all_then_read(server: RunningServer, payload: bytes) -> bytes:
    with connect(server) as sock:
        # The server may stop reading and close mid-send: the refusal we expect.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(payload)
        return read_until_closed(sock)


def test_huge_header_is_refused(limited: RunningServer) -> None:
    payload = request_head("X-Big: " + "a" * (16 * 1024 * 1024) + "\r\n\r\n", length=2)
    answer = send_all_then_read(limited, payload + b"{}")
    assert refused(answer), answer[:200]


@pytest.mark.parametrize("count", [20_000, MAX_HEADER_COUNT + 10])
def test_too_many_headers_are_refused(limited: RunningServer, count: int) -> None:
    extra = "".join(f"X-H{i}: v\r\n" for i in range(count)) + "\r\n"
    answer = send_all_then_read(limited, request_head(extra, length=2) + b"{}")
    assert refused(answer), answer[:200]
    if count < 1000:  # small enough for the size limit: the count limit answers
        assert answer.startswith(b"HTTP/1.1 431 ")
        assert b"header fields" in answer


def test_ordinary_clients_are_unaffected(limited: RunningServer) -> None:
    with openai.OpenAI(base_url=limited.v1, api_key=API_KEY, max_retries=0) as sdk:
        for _ in range(2):  # the second call reuses the kept-alive connection
            reply = sdk.chat.completions.create(
                model="gemma-3-270m",
                messages=[{"role": "user", "content": "Say hi."}],
                max_tokens=2,
            )
            assert reply.choices[0].finish_reason in ("stop", "length")
    # An idle kept-alive connection answers to the keep-alive timeout (5 s), not to the
    # header deadline: a pause longer than the latter between requests is fine.
    with httpx.Client(base_url=limited.base_url) as http:
        assert http.get("/health").status_code == 200
        time.sleep(HEADER_TIMEOUT_S + 0.5)
        assert http.get("/health").status_code == 200
