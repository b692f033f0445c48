"""The engine events of a request's choices → server-sent events (or → their end, for a
non-streamed reply): the one streaming skeleton of every generation endpoint.

:func:`sse_stream` owns what all streams share: framing (:func:`sse_frame`), merging the
choices' event streams as they come, the error event that ends a stream whose generation
failed, the ``[DONE]`` terminator, and cancelling the choices however the stream ends
(finished, failed, or the client gone). An endpoint plugs in a :class:`StreamWriter`:
how its engine events become its chunks (pydantic models), what opens and closes its
stream, and, for typed streams (``event: ...`` lines), each chunk's event name.
"""

from __future__ import annotations

import asyncio
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import aclosing, asynccontextmanager
from types import MappingProxyType
from typing import Any, Protocol

from pydantic import BaseModel

from ggufserve.engine.base import Failed, Finished, GenerationEvent, PromptLogprobs, TextDelta
from ggufserve.errors import (
    APIError,
    InternalServerError,
    InvalidRequestError,
    ModelUnavailableError,
)

log = logging.getLogger(__name__)

SSE_MEDIA_TYPE = "text/event-stream"
# No caching, and no buffering by reverse proxies (nginx): each event goes out as it comes.
SSE_HEADERS: Mapping[str, str] = MappingProxyType(
    {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
)

# Failed codes of ggufserve.engine.sampling's GrammarFailure: the request's constraints are
# at fault, not the server (400; in a stream, the error event after the partial output).
GRAMMAR_FAILURES = {
    "grammar_too_expensive": "The output constraints (response_format or tools) took too "
    "long to check for one token; simplify the schema.",
    "grammar_dead_end": "The output constraints (response_format or tools) allow no "
    "further token; the output was stopped rather than let break them.",
}


def sse_frame(data: str, event: str | None = None) -> str:
    """One server-sent event: an optional ``event: <name>`` line, then ``data: <line>`` for
    each line of ``data`` (SSE splits a multi-line payload so), then a blank line.

    ``sse_frame('{"a": 1}')`` is ``'data: {"a": 1}\\n\\n'``;
    ``sse_frame("{}", "message_start")`` is ``'event: message_start\\ndata: {}\\n\\n'``.
    """
    head = f"event: {event}\n" if event is not None else ""
    lines = "".join(f"data: {line}\n" for line in data.split("\n"))
    return f"{head}{lines}\n"


# The terminator of OpenAI's chat and text completion streams.
DONE = sse_frame("[DONE]")


def failure(event: Failed, request_id: str) -> APIError:
    """The error a failed generation answers with (the HTTP error of a non-streamed reply,
    the error event of a stream)."""
    if event.code == "kv_cache_full":
        return ModelUnavailableError(
            "The model's context memory is full with other requests; retry shortly.",
            code="kv_cache_full",
            retry_after_s=2,
        )
    if event.code in GRAMMAR_FAILURES:
        return InvalidRequestError(GRAMMAR_FAILURES[event.code], code=event.code)
    return InternalServerError(request_id)


class EventSource(Protocol):
    """One choice's engine events (an engine ``Generation`` is one)."""

    def events(self) -> AsyncIterator[GenerationEvent]:
        """Events up to and including a final ``Finished`` or ``Failed``."""
        ...

    def cancel(self) -> None:
        """Stop generating (a no-op once finished); must not block."""
        ...


async def _choice_events(
    index: int, source: EventSource
) -> AsyncGenerator[tuple[int, GenerationEvent], None]:
    """A source's events tagged with ``index``. A source that raises or stops before its
    Finished/Failed still ends its choice (as an internal failure), or the request would
    wait forever."""
    ended = False
    try:
        async for event in source.events():
            ended = isinstance(event, (Finished, Failed))
            yield index, event
    except Exception:
        log.exception("choice %d's events broke off", index)
    if not ended:
        yield index, Failed()


async def _merged(
    sources: Sequence[EventSource],
) -> AsyncGenerator[tuple[int, GenerationEvent], None]:
    if len(sources) == 1:
        # One choice (the common case): its events as they come, no queue hop per token.
        async with aclosing(_choice_events(0, sources[0])) as events:
            async for item in events:
                yield item
        return
    queue: asyncio.Queue[tuple[int, GenerationEvent]] = asyncio.Queue()

    async def pump(index: int, source: EventSource) -> None:
        async with aclosing(_choice_events(index, source)) as events:
            async for item in events:
                await queue.put(item)

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(sources)]
    try:
        pending = len(sources)
        while pending:
            index, event = await queue.get()
            if isinstance(event, (Finished, Failed)):
                pending -= 1
            yield index, event
    finally:
        for task in tasks:
            task.cancel()


@asynccontextmanager
async def merged_events(
    sources: Sequence[EventSource],
) -> AsyncIterator[AsyncIterator[tuple[int, GenerationEvent]]]:
    """The events of several choices as they come, tagged with the choice's index, until
    every choice has sent its ``Finished`` or ``Failed``::

        async with merged_events(sources) as events:
            async for index, event in events: ...

    Leaving the block (done, ``break``, an error, or a cancellation when the client
    leaves, iterated or not) cancels every source: the one place a request's choices are
    stopped.
    """
    events = _merged(sources)
    try:
        yield events
    finally:
        for source in sources:
            source.cancel()
        await events.aclose()  # stops the pumps; returns at once (no await in its finally)


async def run_to_end(
    sources: Sequence[EventSource],
    request_id: str,
    on_event: Callable[[int, GenerationEvent], None],
) -> list[Finished]:
    """Drive every choice to its end, handing each event to ``on_event``; the choices'
    ``Finished`` events in index order. The sources are cancelled on the way out.

    Raises:
        APIError: a choice failed (see :func:`failure`).
    """
    finished: dict[int, Finished] = {}
    async with merged_events(sources) as events:
        async for index, event in events:
            if isinstance(event, Failed):
                raise failure(event, request_id)
            if isinstance(event, Finished):
                finished[index] = event
            on_event(index, event)
    return [finished[i] for i in range(len(sources))]


class StreamWriter(ABC):
    """What one endpoint's stream says; :func:`sse_stream` frames and sends it.

    Subclasses implement :meth:`on_event` and override the rest as their stream needs.
    The defaults are OpenAI's chat/completions shape: plain ``data:`` frames, the error
    envelope as the error event, ``[DONE]`` last.
    """

    # Sent after everything else, unless None (the Responses and Messages streams end
    # with a typed event instead).
    terminator: str | None = DONE
    # The event name of the error frame (None: a plain ``data:`` frame).
    error_event: str | None = None

    def opening(self) -> Iterable[BaseModel]:
        """Chunks sent before any engine event (e.g. chat's role deltas)."""
        return ()

    @abstractmethod
    def on_event(
        self, index: int, event: TextDelta | PromptLogprobs | Finished
    ) -> Iterable[BaseModel]:
        """Chunks for one event of choice ``index`` (``Failed`` never reaches here)."""

    def closing(self, finished: list[Finished]) -> Iterable[BaseModel]:
        """Chunks sent once every choice has finished (``finished`` in index order), e.g.
        the usage chunk; not sent after a failure."""
        return ()

    def event_name(self, chunk: BaseModel) -> str | None:
        """The ``event:`` name of a chunk's frame (None: a plain ``data:`` frame)."""
        return None

    def error_payload(self, error: APIError) -> dict[str, Any]:
        """The JSON body of the error event: ``{"error": {"message", "type", "param",
        "code"}}`` by default."""
        return error.envelope()


def _frame(writer: StreamWriter, chunk: BaseModel) -> str:
    return sse_frame(chunk.model_dump_json(), writer.event_name(chunk))


async def chunk_stream(
    sources: Sequence[EventSource], request_id: str, writer: StreamWriter
) -> AsyncGenerator[BaseModel, None]:
    """A request's choices as ``writer``'s chunk models: its opening chunks, then each
    event's chunks as the choices produce them, then (all finished) its closing chunks.
    However the iteration ends (done, a failure, ``aclose``, a cancellation), every
    source is cancelled (see :func:`merged_events`).

    Raises:
        APIError: a choice failed (see :func:`failure`); the other choices are stopped.
    """
    finished: dict[int, Finished] = {}
    async with merged_events(sources) as events:
        for chunk in writer.opening():
            yield chunk
        async for index, event in events:
            if isinstance(event, Failed):
                raise failure(event, request_id)
            if isinstance(event, Finished):
                finished[index] = event
            for chunk in writer.on_event(index, event):
                yield chunk
        for chunk in writer.closing([finished[i] for i in range(len(sources))]):
            yield chunk


async def sse_stream(
    sources: Sequence[EventSource], request_id: str, writer: StreamWriter
) -> AsyncIterator[str]:
    """A request's choices as server-sent events: :func:`chunk_stream`'s chunks, each in
    its frame, or (a choice failed) the error event after the partial output; then the
    terminator. However the stream ends (its consumer stops or is cancelled when the
    client leaves), every source is cancelled.

    Yields:
        SSE frames (``str``), one per chunk.
    """
    try:
        async with aclosing(chunk_stream(sources, request_id, writer)) as chunks:
            async for chunk in chunks:
                yield _frame(writer, chunk)
    except APIError as error:
        yield sse_frame(json.dumps(writer.error_payload(error)), writer.error_event)
    if writer.terminator is not None:
        yield writer.terminator
