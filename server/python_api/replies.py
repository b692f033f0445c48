"""Chat replies with ``.parsed``: for a pydantic ``response_format``, each choice's
message also holds its content validated as that class."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from ggufserve.api.wire import ChatCompletion, Choice, ResponseMessage


class ParsedMessage(ResponseMessage):
    """A reply message with ``parsed``: the content validated as the request's pydantic
    ``response_format`` class; None when the choice did not finish with ``stop`` (cut by
    ``max_tokens``: its JSON is incomplete). Left out of ``model_dump`` (the wire shape)."""

    parsed: Any = Field(default=None, exclude=True)


class ParsedChoice(Choice):
    message: ParsedMessage


class ParsedChatCompletion(ChatCompletion):
    """A :class:`ChatCompletion` whose messages are :class:`ParsedMessage`."""

    choices: list[ParsedChoice]  # type: ignore[assignment]  # a narrowed pydantic field


def with_parsed(reply: ChatCompletion, schema: type[BaseModel]) -> ParsedChatCompletion:
    """``reply`` with each stopped choice's content parsed as ``schema``.

    Raises:
        pydantic.ValidationError: a finished content does not validate (the grammar
            enforces the schema's structure; a validator of the class may still refuse).
    """
    parsed = ParsedChatCompletion.model_validate(reply.model_dump())
    for choice in parsed.choices:
        content = choice.message.content
        if choice.finish_reason == "stop" and content:
            choice.message.parsed = schema.model_validate_json(content)
    return parsed
