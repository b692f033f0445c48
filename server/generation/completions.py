"""``/v1/completions``: OpenAI's legacy text completions, including ``echo`` with prompt
logprobs (what lm-evaluation-harness's ``local-completions`` model scores with).

Each prompt of a request gets ``n`` choices; choice ``i * n + j`` is prompt ``i``'s
``j``-th. With ``echo`` the prompt's text (and, with ``logprobs``, its tokens' logprobs,
the first one null) precede the completion.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import anyio.to_thread

from ggufserve.api.refusals import refuse_completion_fields
from ggufserve.api.wire import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionUsage,
)
from ggufserve.engine.base import (
    Failed,
    Finished,
    GenerationEvent,
    GenerationRequest,
    PromptLogprobs,
    TextDelta,
    TokenLogprob,
)
from ggufserve.engine.worker import Generation
from ggufserve.errors import ContextLengthExceededError, InvalidRequestError
from ggufserve.generation.chat import start_jobs
from ggufserve.generation.chat_reply import (
    failure,
    merged_events,
    run_to_end,
    sse_json,
    token_text,
    usage,
)
from ggufserve.generation.prompting import tokenize_text
from ggufserve.generation.sampling_params import sampling_params
from ggufserve.models.registry import ModelRegistry, ServedModel
from ggufserve.settings import ServerSettings


@dataclass(frozen=True)
class Prompt:
    """One prompt of a request: its tokens and the text ``echo`` returns."""

    tokens: list[int]
    text: str


@dataclass(frozen=True)
class PreparedCompletion:
    served: ServedModel
    prompts: list[Prompt]
    jobs: list[list[GenerationRequest]]  # per prompt, one per choice
    completion_id: str
    created: int
    echo: bool
    logprobs: int | None
    include_usage: bool


@dataclass
class ChoiceAccumulator:
    """One choice's text and logprobs (legacy shape: parallel lists)."""

    prompt: Prompt
    echo: bool
    text: list[str] = field(default_factory=list)
    tokens: list[TokenLogprob] = field(default_factory=list)

    def start(self) -> str:
        if self.echo:
            self.text.append(self.prompt.text)
            return self.prompt.text
        return ""

    def prompt_logprobs(self, event: PromptLogprobs) -> None:
        if self.echo:
            self.tokens[:0] = event.tokens

    def feed(self, event: TextDelta) -> None:
        self.text.append(event.text)
        self.tokens.extend(event.logprobs)

    def logprobs(self, offset: int = 0) -> CompletionLogprobs:
        texts = [token_text(t.piece) for t in self.tokens]
        offsets, position = [], offset
        for text in texts:
            offsets.append(position)
            position += len(text)
        return CompletionLogprobs(
            text_offset=offsets,
            token_logprobs=[t.logprob for t in self.tokens],
            tokens=texts,
            top_logprobs=[
                None if t.logprob is None else {token_text(p): lp for p, lp in t.top}
                for t in self.tokens
            ],
        )


class CompletionService:
    """Builds and drives ``/v1/completions`` requests.

    Args:
        registry: The served models.
        settings: Server limits.
    """

    def __init__(self, registry: ModelRegistry, settings: ServerSettings):
        self._registry = registry
        self._settings = settings

    async def prepare(self, body: CompletionRequest, request_id: str) -> PreparedCompletion:
        """Validate and tokenize every prompt.

        Raises:
            InvalidRequestError: a refused field, a prompt over the character cap, a token
                id outside the vocabulary, invalid Unicode, or too many choices.
            ContextLengthExceededError: a prompt + ``max_tokens`` exceed ``n_ctx``.
            ModelNotFoundError / ModelUnavailableError: see ``ModelRegistry.get``.
        """
        served = self._registry.get(body.model)
        # Tokenizing and checking prompts is CPU-bound: a worker thread; the loop only awaits.
        return await anyio.to_thread.run_sync(self._build, body, served, request_id)

    def _build(
        self, body: CompletionRequest, served: ServedModel, request_id: str
    ) -> PreparedCompletion:
        """:meth:`prepare`'s work, in a worker thread (same errors)."""
        refuse_completion_fields(body)
        engine = served.engine
        assert engine is not None
        prompts = self._prompts(body, served)
        n_choices = body.n or 1
        n_max = engine.n_parallel + self._settings.max_queued_requests
        if n_choices * len(prompts) > n_max:
            raise InvalidRequestError(
                f"len(prompt) * n is at most {n_max} for this model.", param="n"
            )
        n_ctx = engine.info.n_ctx
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        for prompt in prompts:
            if len(prompt.tokens) >= n_ctx or len(prompt.tokens) + max_tokens > n_ctx:
                raise ContextLengthExceededError(
                    f"This model's maximum context length is {n_ctx} tokens. However, you "
                    f"requested {len(prompt.tokens) + max_tokens} tokens "
                    f"({len(prompt.tokens)} in the prompt, {max_tokens} in the completion).",
                    param="prompt",
                )
        sampling = sampling_params(body, served, n_choices)
        echo_scores = body.logprobs if body.echo else None
        jobs = [
            [
                GenerationRequest(
                    prompt_tokens=prompt.tokens,
                    max_tokens=max_tokens,
                    sampling=s,
                    stop=list(body.stop or []),
                    logprobs=body.logprobs,
                    prompt_logprobs=echo_scores,
                )
                for s in sampling
            ]
            for prompt in prompts
        ]
        return PreparedCompletion(
            served=served,
            prompts=prompts,
            jobs=jobs,
            completion_id=f"cmpl-{request_id}",
            created=int(time.time()),
            echo=bool(body.echo),
            logprobs=body.logprobs,
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
        )

    def _prompts(self, body: CompletionRequest, served: ServedModel) -> list[Prompt]:
        assert served.engine is not None
        engine = served.engine
        raw = body.prompt
        items: list[str | list[int]]
        if isinstance(raw, str):
            items = [raw]
        elif raw and isinstance(raw[0], int):
            items = [list(raw)]
        else:
            items = list(raw)  # type: ignore[arg-type]
        total = sum(len(item) for item in items if isinstance(item, str))
        if total > self._settings.max_prompt_chars:
            raise InvalidRequestError(
                f"The prompt holds {total} characters; the limit is "
                f"{self._settings.max_prompt_chars}.",
                param="prompt",
            )
        prompts = []
        for item in items:
            if isinstance(item, str):
                prompts.append(Prompt(tokenize_text(served, item, param="prompt"), item))
                continue
            if any(token >= engine.info.n_vocab for token in item):
                raise InvalidRequestError(
                    f"A prompt token id is outside the vocabulary (size {engine.info.n_vocab}).",
                    param="prompt",
                )
            text = engine.token_bytes(item).decode("utf-8", errors="replace")
            prompts.append(Prompt(list(item), text))
        return prompts

    def start(self, prepared: PreparedCompletion) -> list[Generation]:
        """Queue every prompt's choices; on a refusal, cancel those already queued.

        Raises:
            QueueFullError / ModelUnavailableError: see
                :func:`ggufserve.generation.chat.start_jobs`.
        """
        generations: list[Generation] = []
        try:
            for jobs in prepared.jobs:
                generations += start_jobs(prepared.served, jobs)
        except Exception:
            for generation in generations:
                generation.cancel()
            raise
        return generations

    def _choices(self, prepared: PreparedCompletion) -> list[ChoiceAccumulator]:
        n = len(prepared.jobs[0])
        return [
            ChoiceAccumulator(prepared.prompts[i // n], prepared.echo)
            for i in range(n * len(prepared.prompts))
        ]

    async def complete(
        self, prepared: PreparedCompletion, generations: list[Generation], request_id: str
    ) -> Completion:
        """Run every choice to its end.

        Raises:
            InternalServerError / ModelUnavailableError: the engine failed.
        """
        choices = self._choices(prepared)
        for choice in choices:
            choice.start()

        def on_event(index: int, event: GenerationEvent) -> None:
            if isinstance(event, TextDelta):
                choices[index].feed(event)
            elif isinstance(event, PromptLogprobs):
                choices[index].prompt_logprobs(event)

        ordered = await run_to_end(generations, request_id, on_event)
        n = len(prepared.jobs[0])
        return Completion(
            id=prepared.completion_id,
            created=prepared.created,
            model=prepared.served.id,
            choices=[
                CompletionChoice(
                    index=i,
                    text="".join(choice.text),
                    logprobs=choice.logprobs() if prepared.logprobs is not None else None,
                    finish_reason=ordered[i].finish_reason,
                )
                for i, choice in enumerate(choices)
            ],
            usage=_usage(ordered, n),
        )

    async def stream(
        self, prepared: PreparedCompletion, generations: list[Generation], request_id: str
    ) -> AsyncIterator[str]:
        """Server-sent events: text chunks per choice (the echoed prompt first), a finish
        chunk per choice, an optional usage chunk, ``[DONE]``."""

        def chunk(choices: list[CompletionChoice], usage_: CompletionUsage | None = None) -> str:
            body = Completion(
                id=prepared.completion_id,
                created=prepared.created,
                model=prepared.served.id,
                choices=choices,
                usage=usage_,
            )
            return f"data: {body.model_dump_json()}\n\n"

        choices = self._choices(prepared)
        finished: dict[int, Finished] = {}
        sent = [0] * len(choices)
        want = prepared.logprobs is not None
        try:
            async for index, event in merged_events(generations):
                choice = choices[index]
                if isinstance(event, PromptLogprobs):
                    choice.prompt_logprobs(event)
                    continue
                if isinstance(event, Failed):
                    yield sse_json(failure(event, request_id).envelope())
                    break
                if not choice.text:
                    text = choice.start()
                    if text or choice.tokens:
                        yield self._part(chunk, choice, index, text, sent, want)
                if isinstance(event, TextDelta):
                    choice.feed(event)
                    yield self._part(chunk, choice, index, event.text, sent, want)
                elif isinstance(event, Finished):
                    finished[index] = event
                    yield chunk(
                        [CompletionChoice(index=index, text="", finish_reason=event.finish_reason)]
                    )
            else:
                if prepared.include_usage:
                    ordered = [finished[i] for i in range(len(generations))]
                    yield chunk([], _usage(ordered, len(prepared.jobs[0])))
            yield "data: [DONE]\n\n"
        finally:
            for generation in generations:
                generation.cancel()

    @staticmethod
    def _part(
        chunk: Callable[[list[CompletionChoice]], str],
        choice: ChoiceAccumulator,
        index: int,
        text: str,
        sent: list[int],
        want: bool,
    ) -> str:
        """A text chunk carrying the logprobs of the choice's tokens not sent yet
        (``sent[index]`` counts those already sent)."""
        logprobs = None
        if want:
            full = choice.logprobs()
            start = sent[index]
            logprobs = CompletionLogprobs(
                text_offset=full.text_offset[start:],
                token_logprobs=full.token_logprobs[start:],
                tokens=full.tokens[start:],
                top_logprobs=full.top_logprobs[start:],
            )
            sent[index] = len(full.tokens)
        return chunk(
            [CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=None)]
        )


def _usage(finished: list[Finished], n: int) -> CompletionUsage:
    """Prompt tokens once per prompt (its choices share them), completions summed."""
    per_prompt = [usage(finished[i : i + n]) for i in range(0, len(finished), n)]
    total = per_prompt[0]
    for extra in per_prompt[1:]:
        total = total.model_copy(
            update={
                "prompt_tokens": total.prompt_tokens + extra.prompt_tokens,
                "completion_tokens": total.completion_tokens + extra.completion_tokens,
                "total_tokens": total.total_tokens + extra.total_tokens,
            }
        )
    return total
