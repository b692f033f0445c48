"""Chat service: an OpenAI chat request → prompt tokens → engine jobs (one per choice) →
response or stream.

All checks that can fail happen in :meth:`ChatService.prepare`, before any byte of a
response is sent, so that even ``stream=true`` requests get real HTTP errors.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import anyio.to_thread

from ggufserve.api.refusals import refuse_chat_fields
from ggufserve.api.wire import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceLogprobs,
    ChunkChoice,
    CompletionUsage,
    Delta,
)
from ggufserve.engine.base import Failed, Finished, GenerationEvent, GenerationRequest, TextDelta
from ggufserve.engine.sampling import GrammarError
from ggufserve.engine.worker import EngineBusy, EngineClosed, Generation
from ggufserve.errors import (
    ContextLengthExceededError,
    InvalidRequestError,
    ModelUnavailableError,
    QueueFullError,
)
from ggufserve.families.base import ReplyParser
from ggufserve.generation.chat_reply import (
    ChoiceStream,
    ChoiceText,
    failure,
    merged_events,
    run_to_end,
    sse_json,
    usage,
)
from ggufserve.generation.constraints import ToolSelection, reply_grammar, select_tools
from ggufserve.generation.images import ImageLimits, load_image
from ggufserve.generation.prompting import (
    PromptText,
    TemplateInput,
    prompt_char_cap,
    render,
    template_messages,
    text_of,
    tokenize_media,
    tokenize_text,
)
from ggufserve.generation.sampling_params import sampling_params
from ggufserve.models.registry import ModelRegistry, ServedModel
from ggufserve.settings import ServerSettings

THINK_OPEN = "<think>"
# Template variables a request may not set through chat_template_kwargs.
RESERVED_TEMPLATE_VARS = {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"}


@dataclass(frozen=True)
class _Rendered:
    """A request's prompt text, its image URLs (with their params) and its tool choice."""

    text: PromptText
    image_urls: list[tuple[str, str]]
    selection: ToolSelection


@dataclass(frozen=True)
class PreparedChat:
    """A validated request, ready to run: the model, one engine job per choice, what the
    reply may hold, and response ids."""

    served: ServedModel
    jobs: list[GenerationRequest]
    selection: ToolSelection
    reasoning_open: bool
    completion_id: str
    created: int
    include_usage: bool
    want_logprobs: bool

    def parser(self) -> ReplyParser:
        return ReplyParser(self.served.family, self.selection.names, self.reasoning_open)


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
        """Validate, render and tokenize the request; build its grammar.

        Raises:
            InvalidRequestError: refused or inconsistent options, images for a text-only
                model, a prompt over the character cap, invalid Unicode, a template
                rejection, an unenforceable schema keyword, or an out-of-vocabulary
                ``logit_bias`` id.
            ContextLengthExceededError: prompt tokens + ``max_tokens`` exceed ``n_ctx``.
            ModelNotFoundError / ModelUnavailableError: see ``ModelRegistry.get``.
        """
        served = self._registry.get(body.model)
        # Every CPU-bound step runs in a worker thread; the loop only awaits (and fetches images).
        rendered = await anyio.to_thread.run_sync(self._render, body, served)
        images = await self._images(rendered.image_urls) if rendered.image_urls else []
        return await anyio.to_thread.run_sync(
            self._build, body, served, rendered, images, request_id
        )

    def _render(self, body: ChatCompletionRequest, served: ServedModel) -> _Rendered:
        """Check the request's options and render its prompt text (a worker thread).

        Raises:
            InvalidRequestError: see :meth:`prepare` (all but the token-level checks).
        """
        refuse_chat_fields(body)
        engine = served.engine
        assert engine is not None
        n_choices = body.n or 1
        n_max = engine.n_parallel + self._settings.max_queued_requests
        if n_choices > n_max:
            raise InvalidRequestError(f"n is at most {n_max} for this model.", param="n")
        selection = select_tools(body, served.family)
        messages, image_urls = template_messages(body, vision=engine.info.vision)
        chars = sum(len(text_of(m["content"])) for m in messages)
        # No more text than n_ctx tokens could spell: refused before rendering/tokenizing.
        cap = prompt_char_cap(engine.info, self._settings.max_prompt_chars)
        if chars > cap:
            raise InvalidRequestError(
                f"The messages hold {chars} characters; the limit for this model is {cap}.",
                param="messages",
            )
        template = served.template
        if selection.shown or selection.uses_tool_turns:
            template = served.tool_template
        assert template is not None
        prompt_input = TemplateInput(messages, image_urls, selection.shown, _template_extra(body))
        text = render(template, prompt_input, engine.special_tokens)
        return _Rendered(text, image_urls, selection)

    def _build(
        self,
        body: ChatCompletionRequest,
        served: ServedModel,
        rendered: _Rendered,
        images: list[Any],
        request_id: str,
    ) -> PreparedChat:
        """Tokenize the prompt, check it fits, build and compile the reply's grammar and
        make one job per choice (a worker thread: tokenizing and grammar conversion take
        milliseconds to seconds).

        Raises:
            InvalidRequestError / ContextLengthExceededError: see :meth:`prepare`.
        """
        engine = served.engine
        assert engine is not None
        text, selection = rendered.text, rendered.selection
        n_choices = body.n or 1
        reasoning_open = text.text.rstrip().endswith(THINK_OPEN)
        prompt: list[int] = []
        media = None
        if rendered.image_urls:
            media = tokenize_media(served, text, images)
            n_prompt = media.n_tokens
        else:
            prompt = tokenize_text(served, text)
            n_prompt = len(prompt)
        n_ctx = engine.info.n_ctx
        max_tokens = body.max_completion_tokens or body.max_tokens
        if n_prompt >= n_ctx or (max_tokens is not None and n_prompt + max_tokens > n_ctx):
            wanted = max_tokens or 1
            raise ContextLengthExceededError(
                f"This model's maximum context length is {n_ctx} tokens. However, you requested "
                f"{n_prompt + wanted} tokens ({n_prompt} in the messages, {wanted} in the "
                "completion). Please reduce the length of the messages or completion."
            )
        opener = served.family.call_openers[0] if served.family else ""
        grammar = reply_grammar(
            body,
            selection,
            served.family,
            reasoning_open=reasoning_open,
            opener_tokens=engine.tokenize(opener) if opener else [],
        )
        if grammar is not None:
            try:
                engine.check_grammar(grammar)
            except GrammarError:
                raise InvalidRequestError(
                    "The output constraints could not be compiled to a grammar.",
                    param="response_format" if not selection.callable else "tools",
                ) from None
        want_logprobs = bool(body.logprobs)
        samplings = sampling_params(body, served, n_choices)
        job = GenerationRequest(
            prompt_tokens=prompt,
            max_tokens=max_tokens or n_ctx - n_prompt,
            sampling=samplings[0],
            stop=list(body.stop or []),
            media=media,
            grammar=grammar,
            logprobs=(body.top_logprobs or 0) if want_logprobs else None,
        )
        return PreparedChat(
            served=served,
            jobs=[replace(job, sampling=s) for s in samplings],
            selection=selection,
            reasoning_open=reasoning_open,
            completion_id=f"chatcmpl-{request_id}",
            created=int(time.time()),
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
            want_logprobs=want_logprobs,
        )

    async def _images(self, urls: list[tuple[str, str]]) -> list[Any]:
        """Fetch and decode every image, concurrently.

        Raises:
            InvalidRequestError: too many images, or a bad image (ImageInputError).
        """
        limits = self._image_limits
        if len(urls) > limits.max_images:
            raise InvalidRequestError(
                f"At most {limits.max_images} images per request.", param="messages"
            )
        return list(
            await asyncio.gather(*(load_image(url, limits, param=param) for url, param in urls))
        )

    def start(self, prepared: PreparedChat) -> list[Generation]:
        """Queue the request's choices on the model's engine (all or none).

        Raises:
            QueueFullError: the model's queue is full (429 with Retry-After).
            ModelUnavailableError: the engine is shutting down.
        """
        return start_jobs(prepared.served, prepared.jobs)

    async def complete(
        self, prepared: PreparedChat, generations: list[Generation], request_id: str
    ) -> ChatCompletion:
        """Run every choice to its end and build the full response.

        Raises:
            InternalServerError: the engine failed mid-generation.
            ModelUnavailableError: the KV cache filled up (``kv_cache_full``, retry).
        """
        texts = [ChoiceText(prepared.parser(), prepared.want_logprobs) for _ in generations]

        def on_event(index: int, event: GenerationEvent) -> None:
            if isinstance(event, TextDelta):
                texts[index].feed(event)

        ordered = await run_to_end(generations, request_id, on_event)
        return ChatCompletion(
            id=prepared.completion_id,
            created=prepared.created,
            model=prepared.served.id,
            choices=[text.choice(i, ordered[i]) for i, text in enumerate(texts)],
            usage=usage(ordered),
        )

    async def stream(
        self, prepared: PreparedChat, generations: list[Generation], request_id: str
    ) -> AsyncIterator[str]:
        """Server-sent events: per choice a role delta, content / reasoning deltas, tool
        call deltas and a finish chunk; an optional usage chunk; ``[DONE]``. An engine
        failure becomes an error event before ``[DONE]``."""

        def chunk(
            delta: Delta,
            *,
            index: int = 0,
            finish: Any = None,
            logprobs: ChoiceLogprobs | None = None,
            usage: CompletionUsage | None = None,
        ) -> str:
            choices = (
                []
                if usage is not None
                else [
                    ChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)
                ]
            )
            body = ChatCompletionChunk(
                id=prepared.completion_id,
                created=prepared.created,
                model=prepared.served.id,
                choices=choices,
                usage=usage,
            )
            return f"data: {body.model_dump_json()}\n\n"

        streams = [
            ChoiceStream(i, prepared.parser(), prepared.want_logprobs, chunk)
            for i in range(len(generations))
        ]
        finished: dict[int, Finished] = {}
        try:
            for choice in streams:
                yield choice.start()
            async for index, event in merged_events(generations):
                if isinstance(event, TextDelta):
                    for line in streams[index].text(event):
                        yield line
                elif isinstance(event, Finished):
                    finished[index] = event
                    for line in streams[index].finish(event):
                        yield line
                elif isinstance(event, Failed):
                    yield sse_json(failure(event, request_id).envelope())
                    break
            else:
                if prepared.include_usage:
                    ordered = [finished[i] for i in range(len(generations))]
                    yield chunk(Delta(), usage=usage(ordered))
            yield "data: [DONE]\n\n"
        finally:
            for generation in generations:
                generation.cancel()


def _template_extra(body: ChatCompletionRequest) -> dict[str, Any]:
    """``chat_template_kwargs`` and ``reasoning_effort`` as template variables.

    Raises:
        InvalidRequestError: a kwarg would replace a variable the server sets.
    """
    extra = dict(body.chat_template_kwargs or {})
    clash = RESERVED_TEMPLATE_VARS & set(extra)
    if clash:
        raise InvalidRequestError(
            f"chat_template_kwargs may not set {sorted(clash)[0]!r}.", param="chat_template_kwargs"
        )
    if body.reasoning_effort is not None:
        extra["reasoning_effort"] = body.reasoning_effort
    return extra


def start_jobs(served: ServedModel, jobs: list[GenerationRequest]) -> list[Generation]:
    """Queue jobs (the choices of one request) on the model's engine, all or none.

    Raises:
        QueueFullError: the model's queue is full (429 with Retry-After).
        ModelUnavailableError: the model is not loaded or the engine is shutting down.
    """
    engine = served.engine
    if engine is None:
        raise ModelUnavailableError("The model is not loaded.")
    try:
        return engine.submit_choices(jobs)
    except EngineBusy as exc:
        raise QueueFullError(
            f"Too many requests are waiting for '{served.id}'; retry later.",
            retry_after_s=exc.retry_after_s,
        ) from None
    except EngineClosed:
        raise ModelUnavailableError("The server is shutting down.", code="draining") from None
