"""The Responses stream writer: :class:`ResponseEvents` turns the chat stream's chunks
(from the chat path's own :class:`~ggufserve.generation.chat_reply.ChatChunks`, so replies
are parsed once, there) into OpenAI's typed Responses events with increasing
``sequence_number``; :func:`ggufserve.generation.streaming.sse_stream` frames them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from ggufserve.api.responses_wire import (
    ArgumentsDeltaEvent,
    ArgumentsDoneEvent,
    ContentPartEvent,
    LifecycleEvent,
    OutputFunctionCall,
    OutputItem,
    OutputItemEvent,
    OutputMessage,
    OutputReasoning,
    OutputText,
    ReasoningDeltaEvent,
    ReasoningDoneEvent,
    ReasoningTextOut,
    ResponseErrorWire,
    ResponseObject,
    StreamEvent,
    TextDeltaEvent,
    TextDoneEvent,
)
from ggufserve.api.wire import Delta
from ggufserve.engine.base import Finished, PromptLogprobs, TextDelta
from ggufserve.errors import APIError
from ggufserve.generation.chat_reply import ChatChunks, usage
from ggufserve.generation.responses_output import (
    finished_response,
    item_id,
    response_usage,
    tool_namespaces,
)
from ggufserve.generation.streaming import StreamWriter, sse_frame

# The error codes OpenAI's ResponseError allows that fit this server's failures.
FAILURE_CODES = {400: "invalid_prompt", 429: "rate_limit_exceeded"}


@dataclass
class _OpenItem:
    """The output item being streamed: its kind, index, id and text so far."""

    kind: str
    index: int
    id: str
    text: list[str] = field(default_factory=list)
    call_id: str = ""
    name: str = ""


class ResponseEvents(StreamWriter):
    """A response's stream: ``response.created``, ``response.in_progress``, then per output
    item ``output_item.added``, its content part and text (or argument) deltas and their
    ``done`` events, ``output_item.done``; last ``response.completed`` or
    ``response.incomplete`` (or, when generation fails, ``response.failed`` with the
    error). Typed ``event:`` lines, no ``[DONE]``.

    Args:
        chunks: The chat path's writer for this request's one choice.
        shell: The response as created (status ``in_progress``, no output).
        count_reasoning: Tokens of a reasoning text (for ``reasoning_tokens``).
        on_done: Called with the final response (to store it).
        clock: Unix time in seconds.
        defer_final: Leave the last event out of :meth:`closing`; the caller gets it from
            :meth:`final_frame` in a worker thread (it tokenizes and writes the store).
    """

    terminator = None
    error_event = "response.failed"

    def __init__(
        self,
        chunks: ChatChunks,
        shell: ResponseObject,
        count_reasoning: Callable[[str], int],
        on_done: Callable[[ResponseObject], None],
        clock: Callable[[], float],
        defer_final: bool = False,
    ):
        self._defer_final = defer_final
        self._finished: list[Finished] | None = None
        self._chunks = chunks
        self._shell = shell
        self._namespaces = tool_namespaces(shell)  # once: every function_call item reads it
        self._suffix = shell.id.removeprefix("resp_")
        self._count_reasoning = count_reasoning
        self._on_done = on_done
        self._clock = clock
        self._sequence = 0
        self._items: list[OutputItem] = []
        self._open: _OpenItem | None = None
        self._finish_reason: str | None = None
        self._reasoning: list[str] = []

    def _seq(self) -> int:
        self._sequence += 1
        return self._sequence - 1

    def event_name(self, chunk: BaseModel) -> str | None:
        return getattr(chunk, "type", None)

    def opening(self) -> list[StreamEvent]:
        list(self._chunks.opening())  # the chat role delta has no Responses event
        return [
            LifecycleEvent(
                type="response.created", sequence_number=self._seq(), response=self._shell
            ),
            LifecycleEvent(
                type="response.in_progress", sequence_number=self._seq(), response=self._shell
            ),
        ]

    def on_event(
        self, index: int, event: TextDelta | PromptLogprobs | Finished
    ) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        for chunk in self._chunks.on_event(index, event):
            for choice in chunk.choices:
                out += self._delta(choice.delta)
                if choice.finish_reason is not None:
                    self._finish_reason = choice.finish_reason
                    out += self._finish(choice.finish_reason)
        return out

    def closing(self, finished: list[Finished]) -> list[StreamEvent]:
        if self._defer_final:
            self._finished = finished
            return []
        return self._final(finished)

    def final_frame(self) -> str | None:
        """The deferred last event as its SSE frame, the final response stored first (CPU
        and disk work: call it in a worker thread); None when the stream did not end
        normally (a failure, a client gone) or nothing was deferred."""
        if self._finished is None:
            return None
        (event,) = self._final(self._finished)
        return sse_frame(event.model_dump_json(), event.type)

    def _final(self, finished: list[Finished]) -> list[StreamEvent]:
        totals = response_usage(usage(finished), self._count_reasoning("".join(self._reasoning)))
        final = finished_response(
            self._shell, self._items, self._finish_reason, totals, self._clock()
        )
        self._on_done(final)
        if final.status == "incomplete":
            return [
                LifecycleEvent(
                    type="response.incomplete", sequence_number=self._seq(), response=final
                )
            ]
        return [
            LifecycleEvent(type="response.completed", sequence_number=self._seq(), response=final)
        ]

    def error_payload(self, error: APIError) -> dict[str, Any]:
        partial = [self._item(self._open, "incomplete")] if self._open is not None else []
        failed = self._shell.model_copy(
            update={
                "status": "failed",
                "output": [*self._items, *partial],
                "error": ResponseErrorWire(
                    code=FAILURE_CODES.get(error.status_code, "server_error"),
                    message=error.message,
                    param=error.param,
                    type=error.code or error.error_type,
                ),
            }
        )
        event = LifecycleEvent(type="response.failed", sequence_number=self._seq(), response=failed)
        return event.model_dump(mode="json")

    # ---- items ------------------------------------------------------------------------

    def _delta(self, delta: Delta) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        if delta.reasoning_content:
            out += self._ensure("reasoning")
            out.append(self._text_delta(delta.reasoning_content))
            self._reasoning.append(delta.reasoning_content)
        if delta.content:
            out += self._ensure("message")
            out.append(self._text_delta(delta.content))
        for call in delta.tool_calls or []:
            if call.id is not None:
                out += self._close()
                name = call.function.name if call.function and call.function.name else ""
                out += self._add("function_call", call_id=call.id, name=name)
            arguments = call.function.arguments if call.function else None
            if arguments and self._open is not None:
                self._open.text.append(arguments)
                out.append(
                    ArgumentsDeltaEvent(
                        sequence_number=self._seq(),
                        item_id=self._open.id,
                        output_index=self._open.index,
                        delta=arguments,
                    )
                )
        return out

    def _finish(self, reason: str) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        if not self._items and self._open is None:
            out += self._add("message")  # an empty reply is still one (empty) message
        return out + self._close("incomplete" if reason == "length" else "completed")

    def _ensure(self, kind: str) -> list[StreamEvent]:
        if self._open is not None and self._open.kind == kind:
            return []
        return self._close() + self._add(kind)

    def _add(self, kind: str, call_id: str = "", name: str = "") -> list[StreamEvent]:
        index = len(self._items)
        opened = _OpenItem(kind, index, item_id(kind, self._suffix, index), [], call_id, name)
        self._open = opened
        out: list[StreamEvent] = [
            OutputItemEvent(
                type="response.output_item.added",
                sequence_number=self._seq(),
                output_index=index,
                item=self._item(opened, "in_progress"),
            )
        ]
        part = self._part(opened)
        if part is not None:
            out.append(
                ContentPartEvent(
                    type="response.content_part.added",
                    sequence_number=self._seq(),
                    item_id=opened.id,
                    output_index=index,
                    content_index=0,
                    part=part,
                )
            )
        return out

    def _close(self, status: str = "completed") -> list[StreamEvent]:
        opened, self._open = self._open, None
        if opened is None:
            return []
        text = "".join(opened.text)
        where: dict[str, Any] = {"item_id": opened.id, "output_index": opened.index}
        out: list[StreamEvent] = []
        if opened.kind == "function_call":
            out.append(
                ArgumentsDoneEvent(
                    sequence_number=self._seq(), name=opened.name, arguments=text, **where
                )
            )
        else:
            done = ReasoningDoneEvent if opened.kind == "reasoning" else TextDoneEvent
            out.append(done(sequence_number=self._seq(), content_index=0, text=text, **where))
            part = self._part(opened)
            assert part is not None
            out.append(
                ContentPartEvent(
                    type="response.content_part.done",
                    sequence_number=self._seq(),
                    content_index=0,
                    part=part,
                    **where,
                )
            )
        item = self._item(opened, status)
        self._items.append(item)
        out.append(
            OutputItemEvent(
                type="response.output_item.done",
                sequence_number=self._seq(),
                output_index=opened.index,
                item=item,
            )
        )
        return out

    def _text_delta(self, text: str) -> StreamEvent:
        assert self._open is not None
        self._open.text.append(text)
        kind = ReasoningDeltaEvent if self._open.kind == "reasoning" else TextDeltaEvent
        return kind(
            sequence_number=self._seq(),
            item_id=self._open.id,
            output_index=self._open.index,
            content_index=0,
            delta=text,
        )

    @staticmethod
    def _part(opened: _OpenItem) -> OutputText | ReasoningTextOut | None:
        text = "".join(opened.text)
        if opened.kind == "message":
            return OutputText(text=text)
        if opened.kind == "reasoning":
            return ReasoningTextOut(text=text)
        return None

    def _item(self, opened: _OpenItem, status: Any) -> OutputItem:
        """The item as added (``in_progress``: no content yet) or done (its full text)."""
        text = "".join(opened.text)
        if opened.kind == "function_call":
            return OutputFunctionCall.named(
                opened.name,
                self._namespaces,
                id=opened.id,
                call_id=opened.call_id,
                arguments=text,
                status=status,
            )
        done = status != "in_progress"
        if opened.kind == "reasoning":
            reasoning = [ReasoningTextOut(text=text)] if done else []
            return OutputReasoning(id=opened.id, content=reasoning, status=status)
        return OutputMessage(
            id=opened.id, content=[OutputText(text=text)] if done else [], status=status
        )
