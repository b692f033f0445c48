"""``/v1/messages`` on the chat path: :class:`MessagesService` translates the request
(:func:`ggufserve.generation.messages_request.chat_request`), lets :class:`ChatService`
check, prepare and start it, and turns the chat path's reply into Anthropic's: the
non-streamed reply from :class:`ChoiceText`'s choice, the stream from :class:`ChatChunks`'
chunks (:class:`MessageEvents`). Reply parsing and SSE framing stay the chat path's.

One choice only (``n`` is no Anthropic concept). Usage: ``input_tokens`` counts the prompt
tokens decoded for the request and ``cache_read_input_tokens`` those reused from the KV
cache (Anthropic's split; their sum is the prompt, what ``count_tokens`` returns).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from pydantic import BaseModel

from ggufserve.api.messages_wire import (
    ContentBlockDeltaEvent,
    ContentBlockOut,
    ContentBlockStartEvent,
    ContentBlockStopEvent,
    InputJSONDelta,
    Message,
    MessageDeltaBody,
    MessageDeltaEvent,
    MessagesInput,
    MessageStartEvent,
    MessageStopEvent,
    PingEvent,
    StopReason,
    TextContent,
    TextDeltaOut,
    ThinkingContent,
    ThinkingDeltaOut,
    ToolUseContent,
    Usage,
    error_body,
)
from ggufserve.api.wire import ChatCompletionChunk, FinishReasonWire, ResponseMessage
from ggufserve.engine.base import Finished, GenerationEvent, PromptLogprobs, TextDelta
from ggufserve.engine.worker import Generation
from ggufserve.errors import APIError, InvalidRequestError
from ggufserve.generation.chat import ChatService, CheckedChat, PreparedChat
from ggufserve.generation.chat_reply import ChatChunks, ChoiceText
from ggufserve.generation.messages_request import chat_request, messages_param
from ggufserve.generation.streaming import StreamWriter, run_to_end, sse_stream
from ggufserve.models.served_model import Lease


@dataclass(frozen=True)
class CheckedMessages:
    chat: CheckedChat


@dataclass(frozen=True)
class PreparedMessages:
    """A prepared chat request, the message id and the prompt's size in tokens (images
    included)."""

    chat: PreparedChat
    message_id: str
    input_tokens: int


@contextmanager
def _messages_params() -> Iterator[None]:
    # The chat path's errors name chat fields; name the Messages fields they came from.
    try:
        yield
    except InvalidRequestError as exc:
        exc.param = messages_param(exc.param)
        raise


def stop_reason(
    finish: FinishReasonWire | None, finished: Finished
) -> tuple[StopReason, str | None]:
    """The chat finish reason and the engine's end → Anthropic's stop reason and the stop
    sequence that ended the reply (the engine's stop scanner names it)."""
    if finish == "tool_calls":
        return "tool_use", None
    if finish == "length":
        return "max_tokens", None
    if finished.stop_sequence is not None:
        return "stop_sequence", finished.stop_sequence
    return "end_turn", None


def reply_blocks(message: ResponseMessage) -> list[ContentBlockOut]:
    """A chat reply message → content blocks: thinking, text, then one per tool call."""
    blocks: list[ContentBlockOut] = []
    if message.reasoning_content:
        blocks.append(ThinkingContent(thinking=message.reasoning_content))
    if message.content:
        blocks.append(TextContent(text=message.content))
    for call in message.tool_calls or []:
        arguments = json.loads(call.function.arguments)  # the parser's object text
        blocks.append(ToolUseContent(id=call.id, name=call.function.name, input=arguments))
    return blocks


def usage(finished: Finished) -> Usage:
    return Usage(
        input_tokens=finished.prompt_tokens - finished.cached_tokens,
        output_tokens=finished.completion_tokens,
        cache_read_input_tokens=finished.cached_tokens,
    )


class MessagesService:
    """``/v1/messages`` as a generation service over a :class:`ChatService`.

    Args:
        chat: The chat service that checks, prepares and starts the translated request.
    """

    def __init__(self, chat: ChatService):
        self._chat = chat

    def check(self, body: MessagesInput) -> CheckedMessages:
        """Translate ``body`` and run the chat path's model-free checks (a worker thread).

        Raises:
            InvalidRequestError: see :func:`chat_request` and :meth:`ChatService.check`
                (``param`` names the Messages field).
        """
        with _messages_params():
            checked = self._chat.check(chat_request(body))
        # Anthropic's clients send a fixed max_tokens (Claude Code: 32,000): fit it.
        return CheckedMessages(replace(checked, fit_max_tokens=True))

    async def prepare(
        self, checked: CheckedMessages, lease: Lease, request_id: str
    ) -> PreparedMessages:
        """Render, tokenize and build the grammar on the leased model.

        Raises:
            InvalidRequestError / ContextLengthExceededError: see :meth:`ChatService.prepare`.
        """
        with _messages_params():
            prepared = await self._chat.prepare(checked.chat, lease, request_id)
        job = prepared.jobs[0]
        n_prompt = job.media.n_tokens if job.media is not None else len(job.prompt_tokens)
        return PreparedMessages(prepared, f"msg_{request_id}", n_prompt)

    def start(self, prepared: PreparedMessages) -> list[Generation]:
        """Queue the request (see :meth:`ChatService.start`)."""
        return self._chat.start(prepared.chat)

    async def complete(
        self, prepared: PreparedMessages, generations: list[Generation], request_id: str
    ) -> Message:
        """Run the reply to its end: Anthropic's message.

        Raises:
            APIError: the engine failed (see :func:`ggufserve.generation.streaming.failure`).
        """
        text = ChoiceText(prepared.chat.parser(), want_logprobs=False)

        def on_event(index: int, event: GenerationEvent) -> None:
            if isinstance(event, TextDelta):
                text.feed(event)

        finished = (await run_to_end(generations, request_id, on_event))[0]
        choice = text.choice(0, finished)
        reason, sequence = stop_reason(choice.finish_reason, finished)
        return Message(
            id=prepared.message_id,
            model=prepared.chat.served.id,
            content=reply_blocks(choice.message),
            stop_reason=reason,
            stop_sequence=sequence,
            usage=usage(finished),
        )

    def stream(
        self, prepared: PreparedMessages, generations: list[Generation], request_id: str
    ) -> AsyncIterator[str]:
        """Anthropic's typed server-sent events (see :class:`MessageEvents`)."""
        return sse_stream(generations, request_id, self.writer(prepared, generations))

    def writer(self, prepared: PreparedMessages, generations: list[Generation]) -> MessageEvents:
        """The stream's writer: :class:`MessageEvents` over the chat path's chunks."""
        return MessageEvents(prepared, self._chat.writer(prepared.chat, generations))


class MessageEvents(StreamWriter):
    """Anthropic's stream over the chat path's chunks: ``message_start`` and ``ping``,
    then per content block (thinking, text, each tool call) ``content_block_start``, its
    deltas (``thinking_delta`` / ``text_delta`` / ``input_json_delta``) and
    ``content_block_stop``, then ``message_delta`` (stop reason, usage) and
    ``message_stop``. Each frame is ``event: <type>``; a failure is ``event: error``
    with Anthropic's error body, and nothing follows it.

    Args:
        prepared: The prepared request (ids, model, prompt size, stop sequences).
        chunks: The chat path's chunk writer for the request's one choice.
    """

    terminator = None
    error_event = "error"

    def __init__(self, prepared: PreparedMessages, chunks: ChatChunks):
        self._prepared = prepared
        self._chunks = chunks
        self._index = -1  # the open block's index, -1 before the first
        self._open: str | None = None  # the open block's kind
        self._finish: FinishReasonWire | None = None

    def opening(self) -> list[BaseModel]:
        prepared = self._prepared
        message = Message(
            id=prepared.message_id,
            model=prepared.chat.served.id,
            content=[],
            stop_reason=None,
            usage=Usage(input_tokens=prepared.input_tokens, output_tokens=0),
        )
        return [MessageStartEvent(message=message), PingEvent()]

    def on_event(self, index: int, event: TextDelta | PromptLogprobs | Finished) -> list[BaseModel]:
        out: list[BaseModel] = []
        for chunk in self._chunks.on_event(index, event):
            out.extend(self._translate(chunk))
        if isinstance(event, Finished) and self._open is not None:
            out.append(ContentBlockStopEvent(index=self._index))
            self._open = None
        return out

    def closing(self, finished: list[Finished]) -> list[BaseModel]:
        done = finished[0]
        reason, sequence = stop_reason(self._finish, done)
        return [
            MessageDeltaEvent(
                delta=MessageDeltaBody(stop_reason=reason, stop_sequence=sequence),
                usage=usage(done),
            ),
            MessageStopEvent(),
        ]

    def event_name(self, chunk: BaseModel) -> str | None:
        return getattr(chunk, "type", None)  # every event model has its type

    def error_payload(self, error: APIError) -> dict[str, Any]:
        return error_body(error)

    def _translate(self, chunk: ChatCompletionChunk) -> Iterable[BaseModel]:
        for choice in chunk.choices:
            delta = choice.delta
            if delta.reasoning_content:
                yield from self._block("thinking", ThinkingContent(thinking=""))
                yield self._delta(ThinkingDeltaOut(thinking=delta.reasoning_content))
            if delta.content:
                yield from self._block("text", TextContent(text=""))
                yield self._delta(TextDeltaOut(text=delta.content))
            for call in delta.tool_calls or []:
                if call.id is not None and call.function is not None:
                    name = call.function.name or ""
                    start = ToolUseContent(id=call.id, name=name, input={})
                    yield from self._block("tool_use", start, new=True)
                if call.function is not None and call.function.arguments:
                    yield self._delta(InputJSONDelta(partial_json=call.function.arguments))
            if choice.finish_reason is not None:
                self._finish = choice.finish_reason

    def _block(self, kind: str, start: ContentBlockOut, new: bool = False) -> Iterator[BaseModel]:
        """Open a block of ``kind`` unless one is open (``new``: always), closing the
        open one first."""
        if self._open == kind and not new:
            return
        if self._open is not None:
            yield ContentBlockStopEvent(index=self._index)
        self._index += 1
        self._open = kind
        yield ContentBlockStartEvent(index=self._index, content_block=start)

    def _delta(self, delta: TextDeltaOut | InputJSONDelta | ThinkingDeltaOut) -> BaseModel:
        return ContentBlockDeltaEvent(index=self._index, delta=delta)
