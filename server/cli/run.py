"""``ggufserve run SOURCE [PROMPT]`` and ``ggufserve chat``: pull (or find) a model, serve
it on a private local port, and chat with it in the terminal, or answer one prompt.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from ggufserve.settings import ModelEntry, ServerSettings
from ggufserve.store.model_store import ModelStore

if TYPE_CHECKING:
    from ggufserve.cli.terminal_chat import ChatSession

LOAD_TIMEOUT_S = 600.0
LOCAL_KEY = "ggufserve-run"


class RunError(Exception):
    """The model could not be served (the message says why)."""


@contextlib.contextmanager
def local_server(entry: ModelEntry, settings: ServerSettings) -> Iterator[str]:
    """Serve ``entry`` alone with uvicorn on a free 127.0.0.1 port, in a thread; yield its
    base URL once the model is loaded; shut down (freeing the model) on exit.

    Raises:
        RunError: the model failed to load or the server did not start.
    """
    import uvicorn

    from ggufserve.api.app import create_app
    from ggufserve.models.registry import ModelRegistry

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = settings.model_copy(update={"host": "127.0.0.1", "port": port})
    app = create_app(settings, ModelRegistry([entry], Path.cwd(), settings))
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="ggufserve-run", daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_loaded(base_url, entry.id, settings.api_key, thread)
        yield base_url
    finally:
        server.should_exit = True
        thread.join(30)


def _wait_loaded(
    base_url: str, model_id: str, api_key: str | None, thread: threading.Thread
) -> None:
    """Poll ``/v1/models`` until the model is ready, with a bar of llama.cpp's loaded
    fraction on the terminal (tqdm: plain lines when stderr is not a terminal)."""
    from tqdm import tqdm

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    started = time.monotonic()
    with tqdm(total=100, desc=f"loading {model_id}", unit="%", file=sys.stderr, leave=False) as bar:
        while time.monotonic() - started < LOAD_TIMEOUT_S:
            if not thread.is_alive():
                raise RunError("the local server stopped while starting (see the log above)")
            card = _card(base_url, model_id, headers)
            if card.get("state") == "ready":
                return
            if card.get("state") == "failed":
                raise RunError(f"'{model_id}' failed to load (see the log above)")
            bar.update(round(100 * (card.get("load_progress") or 0.0)) - bar.n)
            time.sleep(0.1)
    raise RunError(f"'{model_id}' did not load in {LOAD_TIMEOUT_S:.0f} s")


def _card(base_url: str, model_id: str, headers: dict[str, str]) -> dict[str, Any]:
    """The model's ``/v1/models`` card ({} while the server is not answering yet)."""
    try:
        cards = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=5).json()["data"]
    except (httpx.TransportError, ValueError, KeyError):
        return {}
    return next((c for c in cards if c.get("id") == model_id), {})


def _prompt(args: argparse.Namespace) -> str | None:
    """The one-shot prompt: the PROMPT argument, else stdin when it is not a terminal."""
    if args.prompt:
        return " ".join(args.prompt)
    if not sys.stdin.isatty():
        return sys.stdin.read().strip() or None
    return None


def _session(base_url: str, model_id: str | None, api_key: str | None) -> ChatSession:
    """A :class:`ChatSession` on ``model_id`` (default: the server's first model)."""
    import openai

    from ggufserve.cli.terminal_chat import ChatSession

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key or LOCAL_KEY, max_retries=1)
    try:
        cards = client.models.list().data
    except openai.APIError as exc:
        raise RunError(f"cannot list models at {base_url}: {exc.message}") from None
    card = next((c for c in cards if c.id == model_id), None) if model_id else cards[0]
    if card is None:
        known = ", ".join(c.id for c in cards)
        raise RunError(f"the server has no model '{model_id}' (it has: {known})")
    capabilities = (card.model_extra or {}).get("capabilities") or []
    return ChatSession(client, card.id, vision="vision" in capabilities)


def _converse(
    base_url: str, model_id: str | None, args: argparse.Namespace, api_key: str | None
) -> int:
    from ggufserve.cli.terminal_chat import interactive

    session = _session(base_url, model_id, api_key)
    session.system = args.system
    session.max_tokens = args.max_tokens
    for image in args.image or []:
        said = session.attach(str(image))
        if not said.startswith("attached"):
            raise RunError(said)
        print(said, file=sys.stderr)
    prompt = _prompt(args)
    if prompt is not None:
        return 0 if session.ask(prompt, show_stats=False) is not None else 1
    return interactive(session, ModelStore().home / "chat_history")


def run_command(args: argparse.Namespace, settings: ServerSettings) -> int:
    """``ggufserve run``: pull, serve privately, chat (or answer once).

    Raises:
        PullError / StoreError: the source cannot be made into a store entry.
        RunError: the model did not load.
    """
    from ggufserve.store.pull import pull

    store = ModelStore()
    started = time.monotonic()
    record, made = pull(store, args.source, args.quant, report=args.report)
    verb = "made" if made else "found in the store"
    print(f"{record.id}: {verb} ({time.monotonic() - started:.1f} s)", file=sys.stderr)
    entry = record.model_entry()
    if args.n_ctx is not None:
        entry = entry.model_copy(update={"n_ctx": args.n_ctx})
    with local_server(entry, settings) as base_url:
        print(f"ready in {time.monotonic() - started:.1f} s", file=sys.stderr)
        return _converse(base_url, entry.id, args, settings.api_key)


def chat_command(args: argparse.Namespace, api_key: str | None) -> int:
    """``ggufserve chat``: the same chat against a running server.

    Raises:
        RunError: the server does not answer or has no such model.
    """
    return _converse(args.url.rstrip("/"), args.model, args, api_key)
