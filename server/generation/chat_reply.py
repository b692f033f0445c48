"""Engine events of a chat request's choices → OpenAI chat responses and stream chunks
(the stream itself is driven by :mod:`ggufserve.generation.streaming`).

Each choice's text goes through its family's :class:`ReplyParser`, which splits reasoning
(``reasoning_content``) from content and takes tool calls out of the text, so that call
text never reaches ``content``. Logprobs cover every generated token (reasoning and call
text included), in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ggufserve.api.wire import (
    ChatCompletionChunk,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    CompletionUsage,
    Delta,
    DeltaFunctionCall,
    DeltaToolCall,
    FinishReasonWire,
    PromptTokensDetails,
    ResponseFunctionCall,
    ResponseMessage,
    ResponseToolCall,
    TokenLogprobWire,
    TopLogprob,
)
from ggufserve.engine.base import Finished, PromptLogprobs, TextDelta, TokenLogprob
from ggufserve.families.base import ContentDelta, ReplyEvent, ReplyParser, ToolCall
from ggufserve.generation.streaming import StreamWriter


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


@dataclass
class ChoiceStream:
    """Turns one choice's engine events into the choices of its stream chunks (one
    ``ChunkChoice`` per chunk)."""

    index: int
    parser: ReplyParser
    want_logprobs: bool

    def _choice(
        self,
        delta: Delta,
        finish: FinishReasonWire | None = None,
        logprobs: ChoiceLogprobs | None = None,
    ) -> ChunkChoice:
        return ChunkChoice(index=self.index, delta=delta, logprobs=logprobs, finish_reason=finish)

    def start(self) -> ChunkChoice:
        return self._choice(Delta(role="assistant", content=""))

    def text(self, delta: TextDelta) -> list[ChunkChoice]:
        deltas = [_delta(event) for event in self.parser.feed(delta.text)]
        logprobs = (
            ChoiceLogprobs(content=wire_logprobs(delta.logprobs))
            if self.want_logprobs and delta.logprobs
            else None
        )
        if logprobs is not None and not deltas:
            deltas = [Delta()]  # the text is held back (a call, a tag) but its logprobs go now
        return [
            self._choice(d, logprobs=logprobs if i == 0 else None) for i, d in enumerate(deltas)
        ]

    def finish(self, finished: Finished) -> list[ChunkChoice]:
        events, calls = self.parser.finish(truncated=finished.finish_reason == "length")
        out = [self._choice(_delta(event)) for event in events]
        for k, call in enumerate(calls):
            # OpenAI's shape: id, type and name first with empty arguments, then the text.
            out.append(
                self._choice(
                    Delta(
                        tool_calls=[
                            DeltaToolCall(
                                index=k,
                                id=call.id,
                                type="function",
                                function=DeltaFunctionCall(name=call.name, arguments=""),
                            )
                        ]
                    )
                )
            )
            out.append(
                self._choice(
                    Delta(
                        tool_calls=[
                            DeltaToolCall(
                                index=k, function=DeltaFunctionCall(arguments=call.arguments)
                            )
                        ]
                    )
                )
            )
        reason = "tool_calls" if calls else finished.finish_reason
        out.append(self._choice(Delta(), finish=reason))
        return out


class ChatChunks(StreamWriter):
    """A chat completion's stream: per choice a role delta first, then its content /
    reasoning deltas, tool call deltas and finish chunk; the usage chunk last when asked.

    Args:
        completion_id / created / model: The chunks' ``id``, ``created`` and ``model``.
        parsers: One reply parser per choice.
        want_logprobs: Whether chunks carry their tokens' logprobs.
        include_usage: Whether a usage chunk (no choices) closes the stream.
        system_fingerprint: Every chunk's ``system_fingerprint``.
    """

    def __init__(
        self,
        completion_id: str,
        created: int,
        model: str,
        parsers: list[ReplyParser],
        *,
        want_logprobs: bool,
        include_usage: bool,
        system_fingerprint: str | None = None,
    ):
        self._id, self._created, self._model = completion_id, created, model
        self._fingerprint = system_fingerprint
        self._include_usage = include_usage
        self._choices = [ChoiceStream(i, p, want_logprobs) for i, p in enumerate(parsers)]

    def _chunk(
        self, choices: list[ChunkChoice], totals: CompletionUsage | None = None
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self._id,
            created=self._created,
            model=self._model,
            system_fingerprint=self._fingerprint,
            choices=choices,
            usage=totals,
        )

    def opening(self) -> list[ChatCompletionChunk]:
        return [self._chunk([choice.start()]) for choice in self._choices]

    def on_event(
        self, index: int, event: TextDelta | PromptLogprobs | Finished
    ) -> list[ChatCompletionChunk]:
        choice = self._choices[index]
        if isinstance(event, TextDelta):
            parts = choice.text(event)
        elif isinstance(event, Finished):
            parts = choice.finish(event)
        else:
            parts = []
        return [self._chunk([part]) for part in parts]

    def closing(self, finished: list[Finished]) -> list[ChatCompletionChunk]:
        return [self._chunk([], usage(finished))] if self._include_usage else []


def _delta(event: ReplyEvent) -> Delta:
    if isinstance(event, ContentDelta):
        return Delta(content=event.text)
    return Delta(reasoning_content=event.text)
