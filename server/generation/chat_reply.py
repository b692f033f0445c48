"""Engine events of a request's choices → OpenAI responses and stream chunks (chat; the
event plumbing is shared with text completions).

Each choice's text goes through its family's :class:`ReplyParser`, which splits reasoning
(``reasoning_content``) from content and takes tool calls out of the text, so that call
text never reaches ``content``. Logprobs cover every generated token (reasoning and call
text included), in order.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from ggufserve.api.wire import (
    Choice,
    ChoiceLogprobs,
    CompletionUsage,
    Delta,
    DeltaFunctionCall,
    DeltaToolCall,
    PromptTokensDetails,
    ResponseFunctionCall,
    ResponseMessage,
    ResponseToolCall,
    TokenLogprobWire,
    TopLogprob,
)
from ggufserve.engine.base import Failed, Finished, GenerationEvent, TextDelta, TokenLogprob
from ggufserve.engine.worker import Generation
from ggufserve.errors import (
    APIError,
    InternalServerError,
    InvalidRequestError,
    ModelUnavailableError,
)
from ggufserve.families.base import ContentDelta, ReplyEvent, ReplyParser, ToolCall


def token_text(piece: bytes) -> str:
    """A token's text as OpenAI reports it (invalid UTF-8 of a partial character shown as
    U+FFFD; the exact bytes are in ``bytes``)."""
    return piece.decode("utf-8", errors="replace")


def wire_logprobs(items: list[TokenLogprob] | tuple[TokenLogprob, ...]) -> list[TokenLogprobWire]:
    """Engine logprobs → OpenAI's ``logprobs.content`` entries."""
    return [
        TokenLogprobWire(
            token=token_text(item.piece),
            logprob=item.logprob if item.logprob is not None else 0.0,
            bytes=list(item.piece),
            top_logprobs=[
                TopLogprob(token=token_text(piece), logprob=lp, bytes=list(piece))
                for piece, lp in item.top
            ],
        )
        for item in items
    ]


def usage(finished: list[Finished]) -> CompletionUsage:
    """Usage of a request: the prompt once (choices share it), completions summed."""
    first = finished[0]
    completion = sum(f.completion_tokens for f in finished)
    return CompletionUsage(
        prompt_tokens=first.prompt_tokens,
        completion_tokens=completion,
        total_tokens=first.prompt_tokens + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=first.cached_tokens),
    )


def _tool_calls(calls: list[ToolCall]) -> list[ResponseToolCall] | None:
    if not calls:
        return None
    return [
        ResponseToolCall(id=c.id, function=ResponseFunctionCall(name=c.name, arguments=c.arguments))
        for c in calls
    ]


@dataclass
class ChoiceText:
    """Accumulates one choice of a non-streamed reply."""

    parser: ReplyParser
    want_logprobs: bool
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)

    def add(self, events: list[ReplyEvent]) -> None:
        for event in events:
            target = self.content if isinstance(event, ContentDelta) else self.reasoning
            target.append(event.text)

    def feed(self, delta: TextDelta) -> None:
        self.logprobs.extend(delta.logprobs)
        self.add(self.parser.feed(delta.text))

    def choice(self, index: int, finished: Finished) -> Choice:
        events, calls = self.parser.finish(truncated=finished.finish_reason == "length")
        self.add(events)
        content = "".join(self.content)
        reasoning = "".join(self.reasoning)
        return Choice(
            index=index,
            message=ResponseMessage(
                content=content if content or not calls else None,
                tool_calls=_tool_calls(calls),
                reasoning_content=reasoning or None,
            ),
            logprobs=(
                ChoiceLogprobs(content=wire_logprobs(self.logprobs)) if self.want_logprobs else None
            ),
            finish_reason="tool_calls" if calls else finished.finish_reason,
        )


async def merged_events(
    generations: list[Generation],
) -> AsyncIterator[tuple[int, GenerationEvent]]:
    """The events of several generations as they come, tagged with the choice index."""
    queue: asyncio.Queue[tuple[int, GenerationEvent]] = asyncio.Queue()

    async def pump(index: int, generation: Generation) -> None:
        async for event in generation.events():
            await queue.put((index, event))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(generations)]
    try:
        pending = len(generations)
        while pending:
            index, event = await queue.get()
            if isinstance(event, (Finished, Failed)):
                pending -= 1
            yield index, event
    finally:
        for task in tasks:
            task.cancel()


async def run_to_end(
    generations: list[Generation],
    request_id: str,
    on_event: Callable[[int, GenerationEvent], None],
) -> list[Finished]:
    """Drive every choice to its end, handing each event to ``on_event``; the choices'
    ``Finished`` events in index order. The generations are cancelled on the way out.

    Raises:
        APIError: a choice failed (see :func:`failure`).
    """
    finished: dict[int, Finished] = {}
    try:
        async for index, event in merged_events(generations):
            if isinstance(event, Failed):
                raise failure(event, request_id)
            if isinstance(event, Finished):
                finished[index] = event
            on_event(index, event)
    finally:
        for generation in generations:
            generation.cancel()
    return [finished[i] for i in range(len(generations))]


def sse_json(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def failure(event: Failed, request_id: str) -> APIError:
    """The error a failed generation answers with."""
    if event.code == "kv_cache_full":
        return ModelUnavailableError(
            "The model's context memory is full with other requests; retry shortly.",
            code="kv_cache_full",
            retry_after_s=2,
        )
    if event.code in GRAMMAR_FAILURES:
        return InvalidRequestError(GRAMMAR_FAILURES[event.code], code=event.code)
    return InternalServerError(request_id)


# Failed codes of ggufserve.engine.sampling's GrammarFailure: the request's constraints are
# at fault, not the server (400; in a stream, the error event after the partial output).
GRAMMAR_FAILURES = {
    "grammar_too_expensive": "The output constraints (response_format or tools) took too "
    "long to check for one token; simplify the schema.",
    "grammar_dead_end": "The output constraints (response_format or tools) allow no "
    "further token; the output was stopped rather than let break them.",
}


ChunkMaker = Callable[..., str]


@dataclass
class ChoiceStream:
    """Turns one choice's engine events into stream chunks (via ``make``:
    ``make(delta, index=, finish=None, logprobs=None)`` → an SSE line)."""

    index: int
    parser: ReplyParser
    want_logprobs: bool
    make: ChunkMaker

    def start(self) -> str:
        return self.make(Delta(role="assistant", content=""), index=self.index)

    def text(self, delta: TextDelta) -> list[str]:
        deltas = [_delta(event) for event in self.parser.feed(delta.text)]
        logprobs = (
            ChoiceLogprobs(content=wire_logprobs(delta.logprobs))
            if self.want_logprobs and delta.logprobs
            else None
        )
        if logprobs is not None and not deltas:
            deltas = [Delta()]  # the text is held back (a call, a tag) but its logprobs go now
        return [
            self.make(d, index=self.index, logprobs=logprobs if i == 0 else None)
            for i, d in enumerate(deltas)
        ]

    def finish(self, finished: Finished) -> list[str]:
        events, calls = self.parser.finish(truncated=finished.finish_reason == "length")
        out = [self.make(_delta(event), index=self.index) for event in events]
        for k, call in enumerate(calls):
            # OpenAI's shape: id, type and name first with empty arguments, then the text.
            out.append(
                self.make(
                    Delta(
                        tool_calls=[
                            DeltaToolCall(
                                index=k,
                                id=call.id,
                                type="function",
                                function=DeltaFunctionCall(name=call.name, arguments=""),
                            )
                        ]
                    ),
                    index=self.index,
                )
            )
            out.append(
                self.make(
                    Delta(
                        tool_calls=[
                            DeltaToolCall(
                                index=k, function=DeltaFunctionCall(arguments=call.arguments)
                            )
                        ]
                    ),
                    index=self.index,
                )
            )
        reason = "tool_calls" if calls else finished.finish_reason
        out.append(self.make(Delta(), index=self.index, finish=reason))
        return out


def _delta(event: ReplyEvent) -> Delta:
    if isinstance(event, ContentDelta):
        return Delta(content=event.text)
    return Delta(reasoning_content=event.text)
