"""OpenAI chat messages → the dicts chat templates expect → prompt text → tokens."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ggufserve.api.wire import (
    AssistantMessage,
    ChatCompletionRequest,
    ImagePart,
    SystemMessage,
    TextPart,
    ToolMessage,
)
from ggufserve.engine.base import ModelInfo
from ggufserve.engine.llama import LlamaEngine
from ggufserve.engine.special_tokens import (
    PRIVATE,
    Placeholders,
    PlaceholdersExhausted,
    SpecialTokens,
)
from ggufserve.errors import InvalidRequestError
from ggufserve.families import FAMILIES
from ggufserve.generation.templates import ChatTemplate, ChatTemplateError


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


# Nesting depth of request values the escaping walks (the protocol allows far less).
MAX_ESCAPE_DEPTH = 256


@dataclass(frozen=True)
class PromptText:
    """A rendered prompt: ``text`` with request strings' markup spellings replaced by
    private-use placeholders, and ``restore`` mapping each placeholder to its spelling."""

    text: str
    restore: dict[str, str]


def context_char_cap(info: ModelInfo) -> int:
    """The most characters ``n_ctx`` tokens of the model's longest token could spell: no
    longer text can fit the context."""
    return info.n_ctx * info.max_token_chars


def prompt_char_cap(info: ModelInfo, max_prompt_chars: int) -> int:
    """The most characters a prompt may hold: :func:`context_char_cap`, or
    ``max_prompt_chars`` where that is lower."""
    return min(max_prompt_chars, context_char_cap(info))


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


def render(
    template: ChatTemplate, prompt: TemplateInput, specials: SpecialTokens | None = None
) -> PromptText:
    """The chat template applied with the generation prompt, every string of the request
    (messages, tools, template variables; keys too) escaped first so that only the
    template's own markup spells special tokens (``specials``; None renders unescaped,
    for tests of a template's layout).

    Raises:
        InvalidRequestError: the template rejected the messages or failed; the request
            nests deeper than ``MAX_ESCAPE_DEPTH`` or leaves no private-use character free.
    """
    placeholders = Placeholders(_private_chars(prompt) | template.private_chars)
    if specials is not None:
        prompt = _escaped_input(prompt, specials, placeholders)
    try:
        text = template.render(
            prompt.messages, add_generation_prompt=True, tools=prompt.tools, extra=prompt.extra
        )
    except ChatTemplateError as exc:
        raise InvalidRequestError(exc.client_message, param="messages") from None
    return PromptText(text, placeholders.restore)


def _escaped_input(
    prompt: TemplateInput, specials: SpecialTokens, placeholders: Placeholders
) -> TemplateInput:
    def escape(value: Any, depth: int) -> Any:
        if isinstance(value, str):
            return specials.escape(value, placeholders)
        if depth > MAX_ESCAPE_DEPTH:
            raise InvalidRequestError("The request nests values too deeply.", param="messages")
        if isinstance(value, dict):
            return {escape(k, depth + 1): escape(v, depth + 1) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [escape(item, depth + 1) for item in value]
        return value

    try:
        return TemplateInput(
            escape(prompt.messages, 0),
            prompt.image_urls,
            None if prompt.tools is None else escape(prompt.tools, 0),
            None if prompt.extra is None else escape(prompt.extra, 0),
        )
    except PlaceholdersExhausted:
        raise InvalidRequestError(
            "The request uses too many private-use characters.", param="messages"
        ) from None


def _private_chars(prompt: TemplateInput) -> set[str]:
    """Private-use characters of the request (placeholders must differ from them)."""
    found: set[str] = set()
    stack: list[tuple[Any, int]] = [(prompt.messages, 0), (prompt.tools, 0), (prompt.extra, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            found.update(PRIVATE.findall(value))
        elif depth <= MAX_ESCAPE_DEPTH and isinstance(value, dict):
            stack += [(item, depth + 1) for pair in value.items() for item in pair]
        elif depth <= MAX_ESCAPE_DEPTH and isinstance(value, list | tuple):
            stack += [(item, depth + 1) for item in value]
    return found


def _check_length(text: str, info: ModelInfo, param: str) -> None:
    cap = context_char_cap(info)
    if len(text) > cap:
        raise InvalidRequestError(
            f"The prompt holds {len(text)} characters; the limit for this model is {cap}.",
            param=param,
        )


def invalid_unicode(param: str = "messages") -> InvalidRequestError:
    return InvalidRequestError(
        "The request contains invalid Unicode (unpaired surrogates).", param=param
    )


def tokenize_text(
    engine: LlamaEngine, text: str | PromptText, *, param: str = "messages"
) -> list[int]:
    """Tokenize prompt text with exactly one BOS. A rendered prompt's placeholders become
    their spellings as plain text; a plain string (a ``/v1/completions`` prompt) is
    tokenized as llama.cpp does, special-token spellings parsed.

    Raises:
        InvalidRequestError: the text holds unpaired surrogates, or more characters than
            ``n_ctx`` tokens could spell (checked before tokenizing).
    """
    info = engine.info
    prompt = text if isinstance(text, PromptText) else PromptText(text, {})
    _check_length(prompt.text, info, param)
    try:
        tokens = engine.tokenize(prompt.text, prompt.restore)
    except UnicodeEncodeError:
        raise invalid_unicode(param) from None
    # The template normally writes BOS itself; add it only where it did not.
    if info.add_bos and (not tokens or tokens[0] != info.bos_token_id):
        tokens.insert(0, info.bos_token_id)
    return tokens


def tokenize_media(engine: LlamaEngine, text: str | PromptText, images: list[Any]) -> Any:
    """Put mtmd's marker where the template placed each image, tokenize text (as
    :func:`tokenize_text` does) and images.

    Raises:
        InvalidRequestError: the template placed a number of images other than the number
            sent, the text holds unpaired surrogates or is longer than ``n_ctx`` tokens
            could spell.
    """
    prompt = text if isinstance(text, PromptText) else PromptText(text, {})
    _check_length(prompt.text, engine.info, "messages")
    text = prompt.text
    family = FAMILIES.get(engine.info.architecture)
    placeholder = family.image_placeholder if family is not None else None
    placed = placeholder.place(text, len(images), engine.media_marker) if placeholder else None
    if placed is None:
        raise InvalidRequestError(
            "The model's chat template does not place the images of this request.",
            param="messages",
        )
    text = placed
    try:
        return engine.tokenize_media(text, images, prompt.restore)
    except UnicodeEncodeError:
        raise invalid_unicode() from None
    except ValueError:
        raise InvalidRequestError(
            "The images could not be placed in the prompt.", param="messages"
        ) from None
