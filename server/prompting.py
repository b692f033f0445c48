"""OpenAI chat messages → the dicts chat templates expect → prompt text → tokens."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from server.errors import InvalidRequestError
from server.protocol import (
    AssistantMessage,
    ChatCompletionRequest,
    ImagePart,
    SystemMessage,
    TextPart,
    ToolMessage,
)
from server.registry import ServedModel
from server.templates import IMAGE_PLACEHOLDERS, ChatTemplate, ChatTemplateError


@dataclass(frozen=True)
class TemplateInput:
    """What a chat template is rendered with.

    Attributes:
        messages: ``{"role", "content", ...}`` dicts (HF chat-template convention).
        image_urls: Image URLs in prompt order, each with its request path (for errors).
        tools: OpenAI tool dicts to show the model, or None.
        extra: Further template variables (``chat_template_kwargs``, ``reasoning_effort``).
    """

    messages: list[dict[str, Any]]
    image_urls: list[tuple[str, str]]
    tools: list[dict[str, Any]] | None = None
    extra: dict[str, Any] | None = None


def text_of(content: Any) -> str:
    """The text of a message content (a string or a list of parts)."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content)


def _arguments(text: str) -> Any:
    # HF templates expect arguments as a mapping (they tojson it); keep text that is not one.
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


def template_messages(
    body: ChatCompletionRequest, *, vision: bool
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """OpenAI messages → the dicts chat templates expect, and the image URLs in order with
    their request paths.

    ``developer`` is OpenAI's new name for ``system``. Content without images becomes one
    string (text parts joined by newlines); with images, a list of ``{"type": "text"}`` and
    ``{"type": "image"}`` parts in the order sent. Assistant ``tool_calls`` keep OpenAI's
    shape with ``arguments`` parsed to a mapping (transformers' convention); tool results
    carry ``tool_call_id`` and the function ``name`` (looked up from the call when absent).

    Raises:
        InvalidRequestError: an image part for a model without a vision projector.
    """
    out: list[dict[str, Any]] = []
    urls: list[tuple[str, str]] = []
    call_names: dict[str, str] = {}
    for index, message in enumerate(body.messages):
        role = "system" if isinstance(message, SystemMessage) else message.role
        content = message.content
        if content is None or isinstance(content, str):
            item: dict[str, Any] = {"role": role, "content": content or ""}
        else:
            parts: list[dict[str, Any]] = []
            for part_index, part in enumerate(content):
                if isinstance(part, ImagePart):
                    param = f"messages.{index}.content.{part_index}"
                    if not vision:
                        raise InvalidRequestError(
                            f"The model '{body.model}' does not accept image input.", param=param
                        )
                    urls.append((part.image_url.url, param))
                    parts.append({"type": "image"})
                elif isinstance(part, TextPart):
                    parts.append({"type": "text", "text": part.text})
            if any(p["type"] == "image" for p in parts):
                item = {"role": role, "content": parts}
            else:
                item = {"role": role, "content": "\n".join(p["text"] for p in parts)}
        if isinstance(message, AssistantMessage):
            if message.tool_calls:
                item["tool_calls"] = [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {
                            "name": call.function.name,
                            "arguments": _arguments(call.function.arguments),
                        },
                    }
                    for call in message.tool_calls
                ]
                call_names.update({c.id: c.function.name for c in message.tool_calls})
            if message.reasoning_content is not None:
                item["reasoning_content"] = message.reasoning_content
        elif isinstance(message, ToolMessage):
            item["tool_call_id"] = message.tool_call_id
            name = message.name or call_names.get(message.tool_call_id)
            if name is not None:
                item["name"] = name
        out.append(item)
    return out, urls


def render(template: ChatTemplate, prompt: TemplateInput) -> str:
    """The chat template applied with the generation prompt.

    Raises:
        InvalidRequestError: the template rejected the messages or failed.
    """
    try:
        return template.render(
            prompt.messages, add_generation_prompt=True, tools=prompt.tools, extra=prompt.extra
        )
    except ChatTemplateError as exc:
        raise InvalidRequestError(exc.client_message, param="messages") from None


def invalid_unicode(param: str = "messages") -> InvalidRequestError:
    return InvalidRequestError(
        "The request contains invalid Unicode (unpaired surrogates).", param=param
    )


def tokenize_text(served: ServedModel, text: str, *, param: str = "messages") -> list[int]:
    """Tokenize rendered prompt text with exactly one BOS.

    Raises:
        InvalidRequestError: the text holds unpaired surrogates.
    """
    assert served.engine is not None
    info = served.engine.info
    try:
        tokens = served.engine.tokenize(text)
    except UnicodeEncodeError:
        raise invalid_unicode(param) from None
    # The template normally writes BOS itself; add it only where it did not.
    if info.add_bos and (not tokens or tokens[0] != info.bos_token_id):
        tokens.insert(0, info.bos_token_id)
    return tokens


def tokenize_media(served: ServedModel, text: str, images: list[Any]) -> Any:
    """Put mtmd's marker where the template placed each image, tokenize text and images.

    Raises:
        InvalidRequestError: the template placed a number of images other than the number
            sent, or the text holds unpaired surrogates.
    """
    engine = served.engine
    assert engine is not None
    placeholder, replacement = IMAGE_PLACEHOLDERS.get(engine.info.architecture, ("", ""))
    if not placeholder or text.count(placeholder) != len(images):
        raise InvalidRequestError(
            "The model's chat template does not place the images of this request.",
            param="messages",
        )
    text = text.replace(placeholder, replacement.format(marker=engine.media_marker))
    try:
        return engine.tokenize_media(text, images)
    except UnicodeEncodeError:
        raise invalid_unicode() from None
    except ValueError:
        raise InvalidRequestError(
            "The images could not be placed in the prompt.", param="messages"
        ) from None
