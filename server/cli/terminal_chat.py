"""The terminal chat of ``ggufserve run`` and ``ggufserve chat``: an OpenAI client (the
official SDK) on a streaming ``/v1/chat/completions``.

Commands: ``/image PATH`` attaches an image to the next message (vision models),
``/system TEXT`` sets the system prompt, ``/clear`` forgets the conversation,
``/save FILE`` writes it as JSON, ``/help``, ``/bye``. A line starting with ``\"\"\"``
begins multi-line input, ended by a line ending with ``\"\"\"``. Ctrl-C stops a reply
(the request is closed, so the server cancels it) and keeps the session; Ctrl-D quits.
"""

from __future__ import annotations

import base64
import contextlib
import json
import mimetypes
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import openai

HELP = """commands:
  /image PATH    attach an image to the next message (vision models)
  /system TEXT   set the system prompt (/system alone shows it)
  /set NAME VAL  set max_tokens, temperature, top_p or seed for the next replies
  /clear         forget the conversation
  /save FILE     save the conversation as JSON
  /bye           quit (or Ctrl-D); Ctrl-C stops a reply
  \"\"\"           begin / end multi-line input"""
MULTILINE = '"""'


@dataclass
class ChatSession:
    """One conversation with one model.

    Args:
        client: An OpenAI client bound to the server's ``/v1``.
        model: Model id; vision: whether it takes images (``/v1/models`` capabilities).
        out: Where replies are written (stdout).
        max_tokens: Bound of each reply in tokens (None: until the model stops or n_ctx).
    """

    client: openai.OpenAI
    model: str
    vision: bool = False
    out: TextIO = sys.stdout
    system: str | None = None
    max_tokens: int | None = None
    options: dict[str, float] = field(default_factory=dict)  # temperature, top_p, seed
    history: list[dict[str, Any]] = field(default_factory=list)
    images: list[str] = field(default_factory=list)  # data URIs for the next message

    def messages(self) -> list[dict[str, Any]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *self.history]

    def ask(self, text: str, *, show_stats: bool = True) -> str | None:
        """Send ``text`` (+ attached images), stream the reply to ``out``; return it.

        Returns None when the server refused the request (the error was printed).
        Ctrl-C while streaming closes the request and keeps what came so far.
        """
        content: Any = text
        if self.images:
            parts = [{"type": "image_url", "image_url": {"url": url}} for url in self.images]
            content = [*parts, {"type": "text", "text": text}]
        self.history.append({"role": "user", "content": content})
        reply, started = [], time.monotonic()
        first: float | None = None
        usage = None
        try:
            stream = self.client.chat.completions.create(  # type: ignore[call-overload]
                model=self.model,
                messages=self.messages(),
                stream=True,
                max_tokens=self.max_tokens,
                extra_body=self.options,
                stream_options={"include_usage": True},
            )
        except openai.APIError as exc:
            self.history.pop()
            self._print_error(exc)
            return None
        except KeyboardInterrupt:  # before the first byte: nothing to keep
            self.history.pop()
            self.out.write("\n[stopped]\n")
            return ""
        self.images = []
        try:
            for chunk in stream:
                usage = chunk.usage or usage
                for choice in chunk.choices:
                    piece = choice.delta.content or ""
                    if piece and first is None:
                        first = time.monotonic()
                    reply.append(piece)
                    self.out.write(piece)
                    self.out.flush()
        except KeyboardInterrupt:
            stream.close()
            self.out.write("\n[stopped]")
        except openai.APIError as exc:
            self._print_error(exc)
        self.out.write("\n")
        text_reply = "".join(reply)
        self.history.append({"role": "assistant", "content": text_reply})
        if show_stats and usage is not None:
            self.out.write(f"[{stats_line(usage, started, first)}]\n")
        return text_reply

    def attach(self, path_text: str) -> str:
        """Read an image file into a data URI for the next message; return a status line."""
        if not self.vision:
            return f"'{self.model}' is a text-only model: it cannot take images"
        path = Path(path_text.strip().strip("'\"")).expanduser()
        try:
            data = path.read_bytes()
        except OSError as exc:
            return f"cannot read {path}: {exc.strerror}"
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        self.images.append(f"data:{mime};base64,{base64.b64encode(data).decode()}")
        return f"attached {path.name} ({len(data) / 1024:.0f} KiB) to the next message"

    def save(self, path_text: str) -> str:
        path = Path(path_text.strip()).expanduser()
        document = {"model": self.model, "messages": self.messages()}
        try:
            path.write_text(json.dumps(document, indent=2, ensure_ascii=False), encoding="utf-8")
        except OSError as exc:
            return f"cannot write {path}: {exc.strerror}"
        return f"saved {len(self.history)} messages to {path}"

    def command(self, line: str) -> str | None:
        """Run a ``/command``; return the line to print, or None to quit."""
        name, _, rest = line.partition(" ")
        actions: dict[str, Callable[[], str | None]] = {
            "/bye": lambda: None,
            "/exit": lambda: None,
            "/help": lambda: HELP,
            "/image": lambda: self.attach(rest) if rest.strip() else "usage: /image PATH",
            "/save": lambda: self.save(rest) if rest.strip() else "usage: /save FILE",
            "/clear": self._clear,
            "/system": lambda: self._set_system(rest),
            "/set": lambda: self._set_option(rest),
        }
        action = actions.get(name.lower())
        return action() if action else f"unknown command {name}; /help lists them"

    def _clear(self) -> str:
        self.history.clear()
        self.images.clear()
        return "conversation cleared"

    def _set_system(self, text: str) -> str:
        if not text.strip():
            return f"system prompt: {self.system!r}"
        self.system = text.strip()
        return "system prompt set"

    def _set_option(self, text: str) -> str:
        name, _, value = text.strip().partition(" ")
        kinds: dict[str, type] = {
            "max_tokens": int,
            "temperature": float,
            "top_p": float,
            "seed": int,
        }
        if name not in kinds:
            return f"usage: /set {{{'|'.join(kinds)}}} VALUE"
        try:
            parsed = kinds[name](value)
        except ValueError:
            return f"{name}: '{value}' is not a number"
        if name == "max_tokens":
            self.max_tokens = parsed
        else:
            self.options[name] = parsed
        return f"{name} = {parsed}"

    def _print_error(self, exc: openai.APIError) -> None:
        body = getattr(exc, "body", None)
        message = body.get("message") if isinstance(body, dict) else None
        self.out.write(f"error: {message or exc.message}\n")


def stats_line(usage: Any, started: float, first: float | None) -> str:
    """``N tokens (prompt P), first after T s, R tok/s`` (times: ``time.monotonic()``)."""
    line = f"{usage.completion_tokens} tokens (prompt {usage.prompt_tokens})"
    if first is None:
        return line
    seconds = time.monotonic() - first
    rate = (usage.completion_tokens - 1) / seconds if seconds > 0 else 0.0
    return f"{line}, first after {first - started:.2f} s, {rate:.1f} tok/s"


def read_message(prompt: str) -> str:
    """One user message: a line, or a ``\"\"\"`` block over several lines.

    Raises:
        EOFError: Ctrl-D / end of input.
    """
    line = input(prompt)
    if not line.lstrip().startswith(MULTILINE):
        return line
    lines = [line.lstrip()[len(MULTILINE) :]]
    while not lines[-1].rstrip().endswith(MULTILINE):
        lines.append(input("... "))
    lines[-1] = lines[-1].rstrip()[: -len(MULTILINE)]
    return "\n".join(lines).strip()


def interactive(session: ChatSession, history_file: Path | None = None) -> int:
    """Read, send, repeat until ``/bye`` or Ctrl-D. Returns the exit code (0)."""
    _enable_line_editing(history_file)
    print(f"chatting with {session.model} ({'vision' if session.vision else 'text'}); /help")
    while True:
        try:
            line = read_message(">>> ")
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /bye quits)")
            continue
        except EOFError:
            print()
            return 0
        if not line.strip():
            continue
        if line.startswith("/"):
            said = session.command(line.strip())
            if said is None:
                return 0
            print(said)
            continue
        session.ask(line)


def _enable_line_editing(history_file: Path | None) -> None:
    """Arrow keys and a persistent input history where GNU readline exists."""
    try:
        import readline
    except ImportError:  # Windows: plain input()
        return
    if history_file is None:
        return
    with contextlib.suppress(OSError):
        history_file.parent.mkdir(parents=True, exist_ok=True)
        readline.read_history_file(history_file)
    readline.set_history_length(1000)
    import atexit

    atexit.register(_save_history, readline, history_file)


def _save_history(readline: Any, history_file: Path) -> None:
    with contextlib.suppress(OSError):
        readline.write_history_file(history_file)
