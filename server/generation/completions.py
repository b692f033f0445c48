"""``/v1/completions``: OpenAI's legacy text completions, including ``echo`` with prompt
logprobs (what lm-evaluation-harness's ``local-completions`` model scores with).

Each prompt of a request gets ``n`` choices; choice ``i * n + j`` is prompt ``i``'s
``j``-th. With ``echo`` the prompt's text (and, with ``logprobs``, its tokens' logprobs,
the first one null) precede the completion.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio.to_thread

from ggufserve.api.refusals import refuse_completion_fields
from ggufserve.api.wire import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionUsage,
    input_items,
)
from ggufserve.engine.base import (
    Finished,
    GenerationEvent,
    GenerationRequest,
    PromptLogprobs,
    TextDelta,
    TokenLogprob,
)
from ggufserve.engine.llama import LlamaEngine
from ggufserve.engine.worker import Generation
from ggufserve.errors import InvalidRequestError
from ggufserve.generation.capacity import check_choices, check_context
from ggufserve.generation.chat import start_jobs
from ggufserve.generation.chat_reply import token_text, usage
from ggufserve.generation.prompting import tokenize_text
from ggufserve.generation.sampling_params import sampling_params
from ggufserve.generation.streaming import StreamWriter, run_to_end, sse_stream
from ggufserve.models.loading import LoadedParts
from ggufserve.models.served_model import Lease, ServedModel
from ggufserve.settings import ServerSettings


@dataclass(frozen=True)
class Prompt:
    """One prompt of a request: its tokens and the text ``echo`` returns."""

    tokens: list[int]
    text: str


@dataclass(frozen=True)
class CheckedCompletion:
    """A request that passed the checks needing no model, and its prompts (texts or token
    id lists)."""

    body: CompletionRequest
    items: list[str | list[int]]


@dataclass(frozen=True)
class PreparedCompletion:
    served: ServedModel
    parts: LoadedParts
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
        settings: Server limits.
    """

    def __init__(self, settings: ServerSettings):
        self._settings = settings

    def check(self, body: CompletionRequest) -> CheckedCompletion:
        """The checks that need no model (run before it is leased, so that a bad request
        never waits for a load).

        Raises:
            InvalidRequestError: a refused field, or prompts over the character cap.
        """
        refuse_completion_fields(body)
        items = input_items(body.prompt)
        total = sum(len(item) for item in items if isinstance(item, str))
        if total > self._settings.max_prompt_chars:
            raise InvalidRequestError(
                f"The prompt holds {total} characters; the limit is "
                f"{self._settings.max_prompt_chars}.",
                param="prompt",
            )
        return CheckedCompletion(body, items)

    async def prepare(
        self, checked: CheckedCompletion, lease: Lease, request_id: str
    ) -> PreparedCompletion:
        """Tokenize every prompt and check the request against the leased model.

        Raises:
            InvalidRequestError: a token id outside the vocabulary, invalid Unicode, or too
                many choices.
            ContextLengthExceededError: a prompt + ``max_tokens`` exceed ``n_ctx``.
        """
        # Tokenizing and checking prompts is CPU-bound: a worker thread; the loop only awaits.
        return await anyio.to_thread.run_sync(self._build, checked, lease, request_id)

    def _build(
        self, checked: CheckedCompletion, lease: Lease, request_id: str
    ) -> PreparedCompletion:
        """:meth:`prepare`'s work, in a worker thread (same errors)."""
        body = checked.body
        engine = lease.parts.engine
        prompts = self._prompts(checked.items, engine)
        n_choices = body.n or 1
        check_choices(
            n_choices * len(prompts),
            engine.n_parallel,
            self._settings.max_queued_requests,
            what="len(prompt) * n",
        )
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        for prompt in prompts:
            check_context(
                len(prompt.tokens), max_tokens, engine.info.n_ctx, part="prompt", param="prompt"
            )
        defaults = lease.served.entry.sampling
        sampling = sampling_params(body, defaults, engine.info.n_vocab, n_choices)
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
                    speculative=body.speculative is not False,
                )
                for s in sampling
            ]
            for prompt in prompts
        ]
        return PreparedCompletion(
            served=lease.served,
            parts=lease.parts,
            prompts=prompts,
            jobs=jobs,
            completion_id=f"cmpl-{request_id}",
            created=int(time.time()),
            echo=bool(body.echo),
            logprobs=body.logprobs,
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
        )

    def _prompts(self, items: list[str | list[int]], engine: LlamaEngine) -> list[Prompt]:
        prompts = []
        for item in items:
            if isinstance(item, str):
                prompts.append(Prompt(tokenize_text(engine, item, param="prompt"), item))
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
                generations += start_jobs(prepared.parts.engine, prepared.served.id, jobs)
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
            system_fingerprint=prepared.parts.system_fingerprint,
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

    def stream(
        self, prepared: PreparedCompletion, generations: list[Generation], request_id: str
    ) -> AsyncIterator[str]:
        """Server-sent events: text chunks per choice (the echoed prompt first), a finish
        chunk per choice, an optional usage chunk, ``[DONE]`` (see
        :func:`ggufserve.generation.streaming.sse_stream`)."""
        return sse_stream(generations, request_id, self.writer(prepared, generations))

    def writer(
        self, prepared: PreparedCompletion, generations: list[Generation]
    ) -> CompletionChunks:
        """The stream's chunk writer (shared by :meth:`stream` and the Python API)."""
        return CompletionChunks(prepared, self._choices(prepared))


class CompletionChunks(StreamWriter):
    """A text completion's stream: per choice its echoed prompt (with ``echo``), its text
    chunks, each carrying the logprobs of its tokens not sent yet, and a finish chunk; the
    usage chunk last when asked."""

    def __init__(self, prepared: PreparedCompletion, choices: list[ChoiceAccumulator]):
        self._prepared = prepared
        self._choices = choices
        self._sent = [0] * len(choices)  # per choice: tokens whose logprobs went out

    def _chunk(
        self, choices: list[CompletionChoice], totals: CompletionUsage | None = None
    ) -> Completion:
        prepared = self._prepared
        return Completion(
            id=prepared.completion_id,
            created=prepared.created,
            model=prepared.served.id,
            system_fingerprint=prepared.parts.system_fingerprint,
            choices=choices,
            usage=totals,
        )

    def on_event(
        self, index: int, event: TextDelta | PromptLogprobs | Finished
    ) -> list[Completion]:
        choice = self._choices[index]
        if isinstance(event, PromptLogprobs):
            choice.prompt_logprobs(event)
            return []
        out = []
        if not choice.text:
            text = choice.start()
            if text or choice.tokens:
                out.append(self._part(index, text))
        if isinstance(event, TextDelta):
            choice.feed(event)
            out.append(self._part(index, event.text))
        else:
            finish = CompletionChoice(index=index, text="", finish_reason=event.finish_reason)
            out.append(self._chunk([finish]))
        return out

    def closing(self, finished: list[Finished]) -> list[Completion]:
        if not self._prepared.include_usage:
            return []
        return [self._chunk([], _usage(finished, len(self._prepared.jobs[0])))]

    def _part(self, index: int, text: str) -> Completion:
        """A text chunk of choice ``index`` with the logprobs of its tokens not sent yet."""
        logprobs = None
        if self._prepared.logprobs is not None:
            full = self._choices[index].logprobs()
            start = self._sent[index]
            logprobs = CompletionLogprobs(
                text_offset=full.text_offset[start:],
                token_logprobs=full.token_logprobs[start:],
                tokens=full.tokens[start:],
                top_logprobs=full.top_logprobs[start:],
            )
            self._sent[index] = len(full.tokens)
        return self._chunk(
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
