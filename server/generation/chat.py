"""Chat service: an OpenAI chat request → prompt tokens → engine jobs (one per choice) →
response or stream.

All checks that can fail happen before any byte of a response is sent, so that even
``stream=true`` requests get real HTTP errors: those needing no model in
:meth:`ChatService.check` (before the model is leased, so none waits for a load), the rest
in :meth:`ChatService.prepare`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import anyio.to_thread

from ggufserve.api.refusals import refuse_chat_fields
from ggufserve.api.wire import ChatCompletion, ChatCompletionRequest
from ggufserve.engine.base import GenerationEvent, GenerationRequest, GrammarSpec, TextDelta
from ggufserve.engine.llama import LlamaEngine
from ggufserve.engine.sampling import GrammarError
from ggufserve.engine.worker import EngineBusy, EngineClosed, Generation
from ggufserve.errors import InvalidRequestError, ModelUnavailableError, QueueFullError
from ggufserve.families.base import ReplyParser, reasoning_tags
from ggufserve.families.reasoning import prompt_opens_reasoning
from ggufserve.generation.capacity import check_choices, check_context
from ggufserve.generation.chat_reply import ChatChunks, ChoiceText, usage
from ggufserve.generation.constraints import (
    ToolSelection,
    format_grammar,
    reply_grammar,
    select_tools,
)
from ggufserve.generation.image_budget import check_request_budget, fit_images
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
from ggufserve.generation.streaming import run_to_end, sse_stream
from ggufserve.models.loading import LoadedParts
from ggufserve.models.served_model import Lease, ServedModel
from ggufserve.settings import ServerSettings

# Template variables a request may not set through chat_template_kwargs.
RESERVED_TEMPLATE_VARS = {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"}


@dataclass(frozen=True)
class CheckedChat:
    """A request that passed the checks needing no model: its tool choice and the
    template variables it sets. ``fit_max_tokens``: a ``max_tokens`` past the context
    left after the prompt is lowered to it instead of refused (Claude Code always asks
    for 32,000 tokens; a local model's context is often smaller)."""

    body: ChatCompletionRequest
    selection: ToolSelection
    template_extra: dict[str, Any]
    format_spec: GrammarSpec | None  # response_format's grammar (None: free text)
    fit_max_tokens: bool = False


@dataclass(frozen=True)
class _Rendered:
    """A request's prompt text, its image URLs (with their params) and its tool choice."""

    text: PromptText
    image_urls: list[tuple[str, str]]
    selection: ToolSelection


@dataclass(frozen=True)
class PreparedChat:
    """A validated request, ready to run: the model and its loaded parts, one engine job
    per choice, what the reply may hold, and response ids."""

    served: ServedModel
    parts: LoadedParts
    jobs: list[GenerationRequest]
    selection: ToolSelection
    reasoning_open: bool
    completion_id: str
    created: int
    include_usage: bool
    want_logprobs: bool

    def parser(self) -> ReplyParser:
        return ReplyParser(self.parts.family, self.selection.names, self.reasoning_open)


class ChatService:
    """Builds prompts and drives generations for ``/v1/chat/completions``.

    Args:
        settings: Server limits (prompt size, images).
    """

    def __init__(self, settings: ServerSettings):
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

    def check(self, body: ChatCompletionRequest) -> CheckedChat:
        """The checks that need no model (run before it is leased, so that a bad request
        never waits for a load; a worker thread).

        Raises:
            InvalidRequestError: a refused field, inconsistent ``tools`` / ``tool_choice`` /
                ``response_format``, a tool or ``response_format`` schema the grammar
                cannot enforce, a ``chat_template_kwargs`` key the server sets, or
                ``image_min_tokens`` above ``image_max_tokens``.
        """
        refuse_chat_fields(body)
        check_request_budget(body.image_min_tokens, body.image_max_tokens)
        selection = select_tools(body)
        return CheckedChat(body, selection, _template_extra(body), format_grammar(body))

    async def prepare(self, checked: CheckedChat, lease: Lease, request_id: str) -> PreparedChat:
        """Render and tokenize the request on the leased model; build its grammar.

        Raises:
            InvalidRequestError: too many choices, tools for a family without a call
                format, images for a text-only model, a prompt over the character cap,
                invalid Unicode, a template rejection, an unenforceable schema keyword,
                an out-of-vocabulary ``logit_bias`` id, or an image token budget the model
                cannot honour (see ``image_budget.request_range``).
            ContextLengthExceededError: prompt tokens + ``max_tokens`` exceed ``n_ctx``
                (the message names each image's tokens).
        """
        # Every CPU-bound step runs in a worker thread; the loop only awaits (and fetches images).
        rendered = await anyio.to_thread.run_sync(self._render, checked, lease.parts)
        images = await self._images(rendered.image_urls) if rendered.image_urls else []
        return await anyio.to_thread.run_sync(
            self._build, checked, lease, rendered, images, request_id
        )

    def _render(self, checked: CheckedChat, parts: LoadedParts) -> _Rendered:
        """Check the request against the model and render its prompt text (a worker thread).

        Raises:
            InvalidRequestError: see :meth:`prepare` (all but the token-level checks).
        """
        body, selection, engine = checked.body, checked.selection, parts.engine
        check_choices(body.n or 1, engine.n_parallel, self._settings.max_queued_requests)
        if body.tools and parts.family is None:
            raise InvalidRequestError("This model's family has no tool-call format.", param="tools")
        messages, image_urls = template_messages(body, vision=engine.info.vision)
        chars = sum(len(text_of(m["content"])) for m in messages)
        # No more text than n_ctx tokens could spell: refused before rendering/tokenizing.
        cap = prompt_char_cap(engine.info, self._settings.max_prompt_chars)
        if chars > cap:
            raise InvalidRequestError(
                f"The messages hold {chars} characters; the limit for this model is {cap}.",
                param="messages",
            )
        template = parts.template
        if selection.shown or selection.uses_tool_turns:
            template = parts.tool_template
        prompt_input = TemplateInput(messages, image_urls, selection.shown, checked.template_extra)
        text = render(template, prompt_input, engine.special_tokens)
        return _Rendered(text, image_urls, selection)

    def _build(
        self,
        checked: CheckedChat,
        lease: Lease,
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
        parts = lease.parts
        engine, family = parts.engine, parts.family
        body, text, selection = checked.body, rendered.text, rendered.selection
        n_choices = body.n or 1
        reasoning_open = prompt_opens_reasoning(text.text, reasoning_tags(family))
        prompt: list[int] = []
        media = None
        if rendered.image_urls:
            images = fit_images(
                images, engine.image_range, body.image_min_tokens, body.image_max_tokens
            )
            media = tokenize_media(engine, text, images)
            n_prompt = media.n_tokens
        else:
            prompt = tokenize_text(engine, text)
            n_prompt = len(prompt)
        n_ctx = engine.info.n_ctx
        max_tokens = body.max_completion_tokens or body.max_tokens
        if checked.fit_max_tokens and max_tokens is not None and n_prompt < n_ctx:
            max_tokens = min(max_tokens, n_ctx - n_prompt)
        images_n = media.image_tokens if media is not None else ()
        check_context(
            n_prompt, max_tokens, n_ctx, part="messages", param="messages", image_tokens=images_n
        )
        spec = reply_grammar(checked.format_spec, selection, family, reasoning_open=reasoning_open)
        grammar = None
        if spec is not None:
            try:  # compiled once here; each choice's sampler starts from a copy
                grammar = engine.compile_grammar(spec)
            except GrammarError:
                raise InvalidRequestError(
                    "The output constraints could not be compiled to a grammar.",
                    param="response_format" if not selection.callable else "tools",
                ) from None
        want_logprobs = bool(body.logprobs)
        defaults = lease.served.entry.sampling
        samplings = sampling_params(body, defaults, engine.info.n_vocab, n_choices)
        job = GenerationRequest(
            prompt_tokens=prompt,
            max_tokens=max_tokens or n_ctx - n_prompt,
            sampling=samplings[0],
            stop=list(body.stop or []),
            media=media,
            grammar=grammar,
            logprobs=(body.top_logprobs or 0) if want_logprobs else None,
            speculative=body.speculative is not False,
        )
        return PreparedChat(
            served=lease.served,
            parts=parts,
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
        return start_jobs(prepared.parts.engine, prepared.served.id, prepared.jobs)

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
            system_fingerprint=prepared.parts.system_fingerprint,
            choices=[text.choice(i, ordered[i]) for i, text in enumerate(texts)],
            usage=usage(ordered),
        )

    def stream(
        self, prepared: PreparedChat, generations: list[Generation], request_id: str
    ) -> AsyncIterator[str]:
        """Server-sent events: per choice a role delta, content / reasoning deltas, tool
        call deltas and a finish chunk; an optional usage chunk; ``[DONE]``. An engine
        failure becomes an error event before ``[DONE]`` (see
        :func:`ggufserve.generation.streaming.sse_stream`)."""
        return sse_stream(generations, request_id, self.writer(prepared, generations))

    def writer(self, prepared: PreparedChat, generations: list[Generation]) -> ChatChunks:
        """The stream's chunk writer (shared by :meth:`stream` and the Python API)."""
        return ChatChunks(
            prepared.completion_id,
            prepared.created,
            prepared.served.id,
            [prepared.parser() for _ in generations],
            want_logprobs=prepared.want_logprobs,
            include_usage=prepared.include_usage,
            system_fingerprint=prepared.parts.system_fingerprint,
        )


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


def start_jobs(
    engine: LlamaEngine, model_id: str, jobs: list[GenerationRequest]
) -> list[Generation]:
    """Queue jobs (the choices of one request) on the model's engine, all or none.

    Raises:
        QueueFullError: the model's queue is full (429 with Retry-After).
        ModelUnavailableError: the engine is shutting down.
    """
    try:
        return engine.submit_choices(jobs)
    except EngineBusy as exc:
        raise QueueFullError(
            f"Too many requests are waiting for '{model_id}'; retry later.",
            retry_after_s=exc.retry_after_s,
        ) from None
    except EngineClosed:
        raise ModelUnavailableError("The server is shutting down.", code="draining") from None
