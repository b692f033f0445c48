"""Chat templates: GGUF-embedded Jinja rendered in a bounded sandbox, with the family's
fallback for files that carry none.

A GGUF's ``tokenizer.chat_template`` is untrusted code. It is rendered in Jinja's
``ImmutableSandboxedEnvironment`` (no attribute access to internals, no mutation of
inputs), with a wall-clock bound checked on every call, attribute and item access and
output chunk, and a bound on the rendered length. Templates sent in requests are never
rendered.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime
from importlib.resources import files
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ggufserve.engine.special_tokens import PRIVATE
from ggufserve.families import FAMILIES


class ChatTemplateError(Exception):
    """The template cannot be compiled, or rendering it failed.

    ``client_message`` is safe to show a client: the template's own ``raise_exception``
    text (e.g. "roles must alternate"), or a generic line; never Jinja internals.
    """

    def __init__(self, client_message: str):
        super().__init__(client_message)
        self.client_message = client_message


class _TemplateRaised(Exception):
    """Raised by ``raise_exception(...)`` inside a template."""


class _BoundExceeded(Exception):
    """The render ran past its time or length bound."""


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """Sandbox whose calls and lookups check the current render's deadline."""

    def __init__(self) -> None:
        super().__init__(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=["jinja2.ext.loopcontrols"],
            autoescape=False,
        )
        self._render = threading.local()
        self.filters["tojson"] = _tojson
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = _strftime_now

    def start(self, deadline: float) -> None:
        self._render.deadline = deadline

    def check(self) -> None:
        if time.monotonic() > getattr(self._render, "deadline", float("inf")):
            raise _BoundExceeded("time")

    def call(self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        self.check()
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        self.check()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        self.check()
        return super().getitem(obj, argument)


def _tojson(value: Any, indent: int | None = None) -> str:
    # HF templates expect non-ASCII kept as is (transformers' chat template utils).
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def shipped_template(name: str) -> str:
    """The source of a template shipped in server/families/chat_templates/ (e.g.
    ``gemma3.jinja``)."""
    return (files("ggufserve.families") / "chat_templates" / name).read_text(encoding="utf-8")


def fallback_template(architecture: str) -> str | None:
    """The source of the fallback template of the family serving a llama.cpp architecture
    name, or None where no family serves it or the family has none."""
    family = FAMILIES.get(architecture)
    name = family.fallback_template if family is not None else None
    return None if name is None else shipped_template(name)


class ChatTemplate:
    """A compiled chat template plus the special-token strings it is rendered with.

    Args:
        source: Jinja source (HF chat-template dialect).
        bos_token: Text of the BOS token (e.g. ``<bos>``), exposed as ``bos_token``.
        eos_token: Text of the EOS token, exposed as ``eos_token``.
        timeout_s: Wall-clock bound for one render, in seconds.
        max_output_chars: Bound on the rendered prompt's length, in characters.

    Raises:
        ChatTemplateError: the source does not compile.
    """

    def __init__(
        self,
        source: str,
        *,
        bos_token: str,
        eos_token: str,
        timeout_s: float,
        max_output_chars: int,
    ):
        self._env = _BoundedSandbox()
        try:
            self._template = self._env.from_string(source)
        except TemplateError:
            raise ChatTemplateError("the model's chat template does not compile") from None
        # Placeholders for request text must differ from the template's own characters.
        self.private_chars = frozenset(PRIVATE.findall(source))
        self._bos_token = bos_token
        self._eos_token = eos_token
        self._timeout_s = timeout_s
        self._max_output_chars = max_output_chars

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """Render ``messages`` (dicts with ``role`` and ``content``, and for tool use
        ``tool_calls`` / ``tool_call_id`` as HF templates expect) to prompt text.

        ``tools`` are OpenAI tool dicts (``{"type": "function", "function": {...}}``);
        ``extra`` holds further template variables (``chat_template_kwargs`` such as
        ``enable_thinking``, and ``reasoning_effort``); it never replaces the variables above.

        Raises:
            ChatTemplateError: the template called ``raise_exception`` (its message is
                kept), failed, ran longer than ``timeout_s``, or produced more than
                ``max_output_chars`` characters.
        """
        self._env.start(time.monotonic() + self._timeout_s)
        pieces: list[str] = []
        size = 0
        try:
            stream = self._template.generate(
                {
                    **(extra or {}),
                    "messages": messages,
                    "add_generation_prompt": add_generation_prompt,
                    "bos_token": self._bos_token,
                    "eos_token": self._eos_token,
                    "tools": tools,
                }
            )
            for piece in stream:
                size += len(piece)
                if size > self._max_output_chars:
                    raise _BoundExceeded("length")
                self._env.check()
                pieces.append(piece)
        except _TemplateRaised as exc:
            raise ChatTemplateError(f"chat template rejected the messages: {exc}") from None
        except _BoundExceeded as exc:
            what = "took too long" if str(exc) == "time" else "produced too long a prompt"
            raise ChatTemplateError(f"rendering the chat template {what}") from None
        except Exception:
            # Any other failure is the template's: report it without Jinja internals.
            raise ChatTemplateError("the model's chat template failed to render") from None
        finally:
            self._env.start(float("inf"))
        return "".join(pieces)
