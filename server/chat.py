"""Chat service: an OpenAI chat request → prompt tokens → engine job → response or stream.

All checks that can fail happen in :meth:`ChatService.prepare`, before any byte of a
response is sent, so that even ``stream=true`` requests get real HTTP errors.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio.to_thread

from server.engine.base import (
    Failed,
    Finished,
    GenerationRequest,
    SamplingParams,
    TextDelta,
)
from server.engine.worker import EngineBusy, EngineClosed, Generation
from server.errors import (
    APIError,
    ContextLengthExceededError,
    InternalServerError,
    InvalidRequestError,
    ModelUnavailableError,
    QueueFullError,
)
from server.images import ImageLimits, load_image
from server.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    CompletionUsage,
    Delta,
    ImagePart,
    PromptTokensDetails,
    ResponseMessage,
    SystemMessage,
    TextPart,
)
from server.registry import ModelRegistry, ServedModel
from server.settings import ServerSettings
from server.templates import IMAGE_PLACEHOLDERS, ChatTemplateError

# llama.cpp treats seed 0xFFFFFFFF as "pick a random seed" (LLAMA_DEFAULT_SEED).
SEED_MODULUS = 2**32 - 1


@dataclass(frozen=True)
class PreparedChat:
    """A validated request, ready to run: the model, the engine job and response ids."""

    served: ServedModel
    job: GenerationRequest
    completion_id: str
    created: int
    include_usage: bool


class ChatService:
    """Builds prompts and drives generations for ``/v1/chat/completions``.

    Args:
        registry: The served models.
        settings: Server limits (prompt size, images).
    """

    def __init__(self, registry: ModelRegistry, settings: ServerSettings):
        self._registry = registry
        self._settings = settings
        self._image_limits = ImageLimits(
            max_images=settings.max_images_per_request,
            max_image_bytes=settings.max_image_bytes,
            max_image_pixels=settings.max_image_pixels,
            fetch_timeout_s=settings.image_fetch_timeout_s,
            max_redirects=settings.max_image_redirects,
            local_media_root=settings.local_media_root,
            allowed_private_networks=tuple(settings.allowed_private_networks),
        )

    async def prepare(self, body: ChatCompletionRequest, request_id: str) -> PreparedChat:
        """Validate, render and tokenize the request.

        Raises:
            InvalidRequestError: unsupported options, images for a text-only model, a
                prompt over the character cap, invalid Unicode, a template rejection, or
                an out-of-vocabulary ``logit_bias`` id.
            ContextLengthExceededError: prompt tokens + ``max_tokens`` exceed ``n_ctx``.
            ModelNotFoundError / ModelUnavailableError: see ``ModelRegistry.get``.
        """
        _reject_unsupported(body)
        served = self._registry.get(body.model)
        assert served.engine is not None
        vision = served.engine.info.vision
        messages, image_urls = _template_messages(body, vision=vision)
        chars = sum(len(_text_of(m["content"])) for m in messages)
        if chars > self._settings.max_prompt_chars:
            raise InvalidRequestError(
                f"The messages hold {chars} characters; the limit is "
                f"{self._settings.max_prompt_chars}.",
                param="messages",
            )
        prompt: list[int] = []
        media = None
        if image_urls:
            media = await self._media_prompt(served, messages, image_urls)
            n_prompt = media.n_tokens
        else:
            # Rendering and tokenizing a long prompt takes milliseconds to seconds: off the loop.
            prompt = await anyio.to_thread.run_sync(_render_and_tokenize, served, messages)
            n_prompt = len(prompt)
        n_ctx = served.engine.info.n_ctx
        max_tokens = body.max_completion_tokens or body.max_tokens
        if n_prompt >= n_ctx or (max_tokens is not None and n_prompt + max_tokens > n_ctx):
            wanted = max_tokens or 1
            raise ContextLengthExceededError(
                f"This model's maximum context length is {n_ctx} tokens. However, you requested "
                f"{n_prompt + wanted} tokens ({n_prompt} in the messages, {wanted} in the "
                "completion). Please reduce the length of the messages or completion."
            )
        job = GenerationRequest(
            prompt_tokens=prompt,
            max_tokens=max_tokens or n_ctx - n_prompt,
            sampling=_sampling(body, served),
            stop=list(body.stop or []),
            media=media,
        )
        return PreparedChat(
            served=served,
            job=job,
            completion_id=f"chatcmpl-{request_id}",
            created=int(time.time()),
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
        )

    async def _media_prompt(
        self, served: ServedModel, messages: list[dict[str, Any]], urls: list[tuple[str, str]]
    ) -> Any:
        """Fetch and decode every image (concurrently), render the template with mtmd's
        marker where each image goes, and tokenize text and images together.

        Raises:
            InvalidRequestError: too many images, a bad image (ImageInputError), or a
                template that does not place exactly one marker per image.
        """
        limits = self._image_limits
        if len(urls) > limits.max_images:
            raise InvalidRequestError(
                f"At most {limits.max_images} images per request.", param="messages"
            )
        images = list(
            await asyncio.gather(*(load_image(url, limits, param=param) for url, param in urls))
        )
        return await anyio.to_thread.run_sync(_render_media, served, messages, images)

    def start(self, prepared: PreparedChat) -> Generation:
        """Queue the job on the model's engine.

        Raises:
            QueueFullError: the model's queue is full (429 with Retry-After).
            ModelUnavailableError: the engine is shutting down.
        """
        engine = prepared.served.engine
        if engine is None:
            raise ModelUnavailableError("The model is not loaded.")
        try:
            return engine.submit(prepared.job)
        except EngineBusy as exc:
            raise QueueFullError(
                f"Too many requests are waiting for '{prepared.served.id}'; retry later.",
                retry_after_s=exc.retry_after_s,
            ) from None
        except EngineClosed:
            raise ModelUnavailableError("The server is shutting down.", code="draining") from None

    async def complete(
        self, prepared: PreparedChat, generation: Generation, request_id: str
    ) -> ChatCompletion:
        """Run to the end and build the full response.

        Raises:
            InternalServerError: the engine failed mid-generation.
            ModelUnavailableError: the KV cache filled up (``kv_cache_full``, retry).
        """
        parts: list[str] = []
        try:
            async for event in generation.events():
                if isinstance(event, TextDelta):
                    parts.append(event.text)
                elif isinstance(event, Finished):
                    return ChatCompletion(
                        id=prepared.completion_id,
                        created=prepared.created,
                        model=prepared.served.id,
                        choices=[
                            Choice(
                                message=ResponseMessage(content="".join(parts)),
                                finish_reason=event.finish_reason,
                            )
                        ],
                        usage=_usage(event),
                    )
                elif isinstance(event, Failed):
                    raise _failure(event, request_id)
            raise InternalServerError(request_id)
        finally:
            generation.cancel()

    async def stream(
        self, prepared: PreparedChat, generation: Generation, request_id: str
    ) -> AsyncIterator[str]:
        """Server-sent events: role delta, content deltas, finish chunk, optional usage
        chunk, ``[DONE]``. An engine failure becomes an error event before ``[DONE]``."""

        def chunk(delta: Delta, finish: Any = None, usage: CompletionUsage | None = None) -> str:
            choices = [] if usage is not None else [ChunkChoice(delta=delta, finish_reason=finish)]
            body = ChatCompletionChunk(
                id=prepared.completion_id,
                created=prepared.created,
                model=prepared.served.id,
                choices=choices,
                usage=usage,
            )
            return f"data: {body.model_dump_json()}\n\n"

        try:
            yield chunk(Delta(role="assistant", content=""))
            async for event in generation.events():
                if isinstance(event, TextDelta):
                    yield chunk(Delta(content=event.text))
                elif isinstance(event, Finished):
                    yield chunk(Delta(), finish=event.finish_reason)
                    if prepared.include_usage:
                        yield chunk(Delta(), usage=_usage(event))
                elif isinstance(event, Failed):
                    yield _sse_json(_failure(event, request_id).envelope())
            yield "data: [DONE]\n\n"
        finally:
            generation.cancel()


def _sse_json(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _usage(event: Finished) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=event.prompt_tokens,
        completion_tokens=event.completion_tokens,
        total_tokens=event.prompt_tokens + event.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=event.cached_tokens),
    )


def _failure(event: Failed, request_id: str) -> APIError:
    """The error a failed generation answers with."""
    if event.code == "kv_cache_full":
        return ModelUnavailableError(
            "The model's context memory is full with other requests; retry shortly.",
            code="kv_cache_full",
            retry_after_s=2,
        )
    return InternalServerError(request_id)


def _reject_unsupported(body: ChatCompletionRequest) -> None:
    """Refuse, by name, options this server does not implement rather than ignore them."""
    if body.n not in (None, 1):
        raise InvalidRequestError("Only n=1 is supported: one choice per request.", param="n")
    if body.logprobs or body.top_logprobs:
        raise InvalidRequestError("logprobs are not supported yet.", param="logprobs")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise InvalidRequestError(
            "response_format other than 'text' is not supported yet.", param="response_format"
        )
    if body.tools:
        raise InvalidRequestError("Tool calling is not supported yet.", param="tools")
    if body.tool_choice not in (None, "none", "auto"):
        raise InvalidRequestError("Tool calling is not supported yet.", param="tool_choice")
    if body.chat_template is not None or body.chat_template_kwargs is not None:
        raise InvalidRequestError(
            "Chat templates come from the model; a template in the request is never rendered.",
            param="chat_template",
        )


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content)


def _template_messages(
    body: ChatCompletionRequest, *, vision: bool
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """OpenAI messages → the ``{"role", "content"}`` dicts chat templates expect, and the
    image URLs in order with their request paths.

    ``developer`` is OpenAI's new name for ``system``. Content without images becomes one
    string (text parts joined by newlines); with images, a list of ``{"type": "text"}`` and
    ``{"type": "image"}`` parts in the order sent.

    Raises:
        InvalidRequestError: an image part for a model without a vision projector.
    """
    out: list[dict[str, Any]] = []
    urls: list[tuple[str, str]] = []
    for index, message in enumerate(body.messages):
        role = "system" if isinstance(message, SystemMessage) else message.role
        content = message.content
        if content is None or isinstance(content, str):
            out.append({"role": role, "content": content or ""})
            continue
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
            out.append({"role": role, "content": parts})
        else:
            out.append({"role": role, "content": "\n".join(p["text"] for p in parts)})
    return out, urls


def _render(served: ServedModel, messages: list[dict[str, Any]]) -> str:
    """The model's chat template applied to ``messages``, with the generation prompt.

    Raises:
        InvalidRequestError: the template rejected the messages or failed.
    """
    assert served.template is not None
    try:
        return served.template.render(messages, add_generation_prompt=True)
    except ChatTemplateError as exc:
        raise InvalidRequestError(exc.client_message, param="messages") from None


def _invalid_unicode() -> InvalidRequestError:
    return InvalidRequestError(
        "The messages contain invalid Unicode (unpaired surrogates).", param="messages"
    )


def _render_media(served: ServedModel, messages: list[dict[str, Any]], images: list[Any]) -> Any:
    """Render, put mtmd's marker where the template placed each image, tokenize.

    Raises:
        InvalidRequestError: the template rejected the messages, or placed a number of
            images other than the number sent.
    """
    engine = served.engine
    assert engine is not None
    prompt = _render(served, messages)
    placeholder, replacement = IMAGE_PLACEHOLDERS.get(engine.info.architecture, ("", ""))
    if not placeholder or prompt.count(placeholder) != len(images):
        raise InvalidRequestError(
            "The model's chat template does not place the images of this request.",
            param="messages",
        )
    prompt = prompt.replace(placeholder, replacement.format(marker=engine.media_marker))
    try:
        return engine.tokenize_media(prompt, images)
    except UnicodeEncodeError:
        raise _invalid_unicode() from None
    except ValueError:
        raise InvalidRequestError(
            "The images could not be placed in the prompt.", param="messages"
        ) from None


def _render_and_tokenize(served: ServedModel, messages: list[dict[str, Any]]) -> list[int]:
    """Render the chat template and tokenize with exactly one BOS.

    Raises:
        InvalidRequestError: the template rejected the messages, or the text holds
            unpaired surrogates.
    """
    assert served.engine is not None
    info = served.engine.info
    prompt = _render(served, messages)
    try:
        tokens = served.engine.tokenize(prompt)
    except UnicodeEncodeError:
        raise _invalid_unicode() from None
    # The template normally writes BOS itself; add it only where it did not.
    if info.add_bos and (not tokens or tokens[0] != info.bos_token_id):
        tokens.insert(0, info.bos_token_id)
    return tokens


def _sampling(body: ChatCompletionRequest, served: ServedModel) -> SamplingParams:
    """Request values over the model's defaults; a random seed unless one is given.

    Raises:
        InvalidRequestError: a ``logit_bias`` token id is outside the vocabulary.
    """
    defaults = served.entry.sampling
    n_vocab = served.engine.info.n_vocab if served.engine else 0
    bias: dict[int, float] = {}
    for key, value in (body.logit_bias or {}).items():
        token = int(key)
        if token >= n_vocab:
            raise InvalidRequestError(
                f"logit_bias token id {token} is outside the vocabulary (size {n_vocab}).",
                param="logit_bias",
            )
        bias[token] = value
    seed = secrets.randbelow(SEED_MODULUS) if body.seed is None else body.seed % SEED_MODULUS

    def pick(name: str) -> Any:
        value = getattr(body, name)
        return getattr(defaults, name) if value is None else value

    return SamplingParams(
        temperature=pick("temperature"),
        top_p=pick("top_p"),
        top_k=pick("top_k"),
        min_p=pick("min_p"),
        presence_penalty=pick("presence_penalty"),
        frequency_penalty=pick("frequency_penalty"),
        repeat_penalty=pick("repeat_penalty"),
        seed=seed,
        logit_bias=bias,
    )
