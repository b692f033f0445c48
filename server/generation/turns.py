"""Agent protocols' conversations → turns every chat template accepts.

Agents send what a chat template may refuse: Codex two ``developer`` messages then two
``user`` messages; Claude Code a ``system`` message after the first user turn (Anthropic's
mid-conversation system messages). Gemma 3's template, like many, takes one leading system
message and then user and assistant turns in alternation. So, for the Responses and
Messages translations: leading system messages become one, a later system message joins
the user turn it stands in (its text kept in place, which keeps earlier turns' prompt
prefix, and so the KV cache, unchanged), and consecutive user messages become one.
"""

from __future__ import annotations

from typing import Any

Message = dict[str, Any]


def merged_turns(messages: list[Message], origins: list[str]) -> tuple[list[Message], list[str]]:
    """``messages`` (chat message dicts) as alternating turns, with the origin (a request
    parameter, for error messages) of each kept message: a merged one keeps its first.

    Messages are not changed; merged ones are new dicts. Linear in the messages' count.
    """
    out: list[Message] = []
    kept: list[str] = []
    started = False  # a non-system message has been seen
    for message, origin in zip(messages, origins, strict=True):
        role = message["role"]
        if role == "system" and started:
            role = "user"
        started = started or role != "system"
        last = out[-1] if out else None
        if last is not None and last["role"] == role and role in ("system", "user"):
            out[-1] = {**last, "content": joined(last["content"], message["content"])}
            continue
        out.append({**message, "role": role})
        kept.append(origin)
    return out, kept


def joined(first: str | list[Any], second: str | list[Any]) -> str | list[Any]:
    """Two messages' contents (text, or content parts) as one, a blank line between."""
    if isinstance(first, str) and isinstance(second, str):
        return f"{first}\n\n{second}"

    def parts(content: str | list[Any]) -> list[Any]:
        return [{"type": "text", "text": content}] if isinstance(content, str) else content

    return [*parts(first), {"type": "text", "text": "\n\n"}, *parts(second)]
