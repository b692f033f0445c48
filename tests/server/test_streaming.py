"""The streaming skeleton (ggufserve.generation.streaming) over fake choices: framing,
``[DONE]``, the error event, the interleaving of several choices, cancellation of every
choice however a stream ends; and the chat and text completion writers' chunks, byte for
byte as OpenAI clients read them. In-process: no model, no server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest
from pydantic import BaseModel

from ggufserve.engine.base import (
    Failed,
    Finished,
    GenerationEvent,
    PromptLogprobs,
    TextDelta,
    TokenLogprob,
)
from ggufserve.errors import APIError, InternalServerError
from ggufserve.families.base import ReplyParser
from ggufserve.generation.chat_reply import ChatChunks
from ggufserve.generation.completions import ChoiceAccumulator, CompletionChunks, Prompt
from ggufserve.generation.streaming import (
    DONE,
    GRAMMAR_FAILURES,
    StreamWriter,
    run_to_end,
    sse_frame,
    sse_stream,
)

T = TypeVar("T")
# Every test ends in milliseconds; a broken skeleton hangs instead.
pytestmark = pytest.mark.timeout(20)
STOP = Finished(finish_reason="stop", prompt_tokens=5, completion_tokens=2, cached_tokens=1)


class FakeSource:
    """One choice whose events the test hands over one by one (``push``); records whether
    it was cancelled and whether its event iterator was closed."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        self.cancelled = False
        self.closed = False

    def push(self, *events: GenerationEvent) -> None:
        for event in events:
            self._queue.put_nowait(event)

    def cancel(self) -> None:
        self.cancelled = True

    async def events(self) -> AsyncIterator[GenerationEvent]:
        try:
            while True:
                event = await self._queue.get()
                yield event
                if isinstance(event, (Finished, Failed)):
                    return
        finally:
            self.closed = True


class Piece(BaseModel):
    index: int
    text: str


class Usage(BaseModel):
    completion_tokens: int


class PieceWriter(StreamWriter):
    """A minimal endpoint: one opening chunk, a chunk per text, a finish chunk, a usage
    chunk."""

    def opening(self) -> Iterable[BaseModel]:
        return [Piece(index=-1, text="open")]

    def on_event(
        self, index: int, event: TextDelta | PromptLogprobs | Finished
    ) -> Iterable[BaseModel]:
        if isinstance(event, TextDelta):
            return [Piece(index=index, text=event.text)]
        if isinstance(event, Finished):
            return [Piece(index=index, text=f"<{event.finish_reason}>")]
        return []

    def closing(self, finished: list[Finished]) -> Iterable[BaseModel]:
        return [Usage(completion_tokens=sum(f.completion_tokens for f in finished))]


class TypedWriter(PieceWriter):
    """A typed stream (as the Responses and Messages APIs send): ``event:`` lines, an
    ``error`` event, no ``[DONE]``."""

    terminator = None
    error_event = "error"

    def event_name(self, chunk: BaseModel) -> str | None:
        return type(chunk).__name__.lower()

    def error_payload(self, error: APIError) -> dict[str, Any]:
        return {"type": "error", "message": error.message}


def frame(model: BaseModel) -> str:
    return f"data: {model.model_dump_json()}\n\n"


def run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(main())


async def take(stream: AsyncIterator[str], count: int) -> list[str]:
    return [await anext(stream) for _ in range(count)]


async def drain(stream: AsyncIterator[str]) -> list[str]:
    return [item async for item in stream]


# ---- framing ---------------------------------------------------------------------------


def test_a_frame_is_data_lines_and_a_blank_line() -> None:
    assert sse_frame('{"a": 1}') == 'data: {"a": 1}\n\n'
    assert sse_frame("[DONE]") == DONE == "data: [DONE]\n\n"


def test_a_named_frame_starts_with_its_event_line() -> None:
    assert sse_frame("{}", "message_start") == "event: message_start\ndata: {}\n\n"


def test_each_line_of_a_multi_line_payload_gets_its_data_prefix() -> None:
    # A bare newline in the payload would otherwise end the event early.
    assert sse_frame("a\nb") == "data: a\ndata: b\n\n"


# ---- the skeleton ----------------------------------------------------------------------


def test_one_choice_opening_chunks_closing_then_done() -> None:
    async def main() -> list[str]:
        source = FakeSource()
        source.push(TextDelta("Hel"), TextDelta("lo"), STOP)
        return await drain(sse_stream([source], "req-1", PieceWriter()))

    assert run(main) == [
        frame(Piece(index=-1, text="open")),
        frame(Piece(index=0, text="Hel")),
        frame(Piece(index=0, text="lo")),
        frame(Piece(index=0, text="<stop>")),
        frame(Usage(completion_tokens=2)),
        DONE,
    ]


def test_choices_interleave_in_the_order_their_events_come() -> None:
    order = [(1, TextDelta("b1")), (0, TextDelta("a1")), (1, STOP), (0, TextDelta("a2"))]

    async def main() -> tuple[list[str], list[str]]:
        sources = [FakeSource(), FakeSource()]
        stream = sse_stream(sources, "req-1", PieceWriter())
        frames = await take(stream, 1)  # the opening chunk
        for index, event in order:
            sources[index].push(event)  # one event at a time: the next frame must be its own
            frames += await take(stream, 1)
        sources[0].push(STOP)
        return frames, await drain(stream)

    frames, rest = run(main)
    assert frames[1:] == [
        frame(Piece(index=1, text="b1")),
        frame(Piece(index=0, text="a1")),
        frame(Piece(index=1, text="<stop>")),
        frame(Piece(index=0, text="a2")),
    ]
    # Closing chunks come once every choice has finished, then [DONE].
    assert rest == [
        frame(Piece(index=0, text="<stop>")),
        frame(Usage(completion_tokens=4)),
        DONE,
    ]


def test_a_failed_choice_ends_the_stream_with_an_error_event_then_done() -> None:
    async def main() -> tuple[list[str], list[FakeSource]]:
        sources = [FakeSource(), FakeSource()]  # choice 1 never sends anything
        sources[0].push(TextDelta("partial"), Failed(code="kv_cache_full"))
        frames = await drain(sse_stream(sources, "req-1", PieceWriter()))
        await asyncio.sleep(0)  # the cancelled pumps close their iterators
        return frames, sources

    frames, sources = run(main)
    assert frames[:2] == [
        frame(Piece(index=-1, text="open")),
        frame(Piece(index=0, text="partial")),
    ]
    error = json.loads(frames[2].removeprefix("data: "))
    assert (error["error"]["type"], error["error"]["code"]) == ("server_error", "kv_cache_full")
    # The error body is json.dumps' spelling, as clients have always received it.
    assert frames[2] == f"data: {json.dumps(error)}\n\n"
    assert frames[3:] == [DONE]  # no closing (usage) chunk after a failure
    assert all(s.cancelled for s in sources)
    assert sources[1].closed


@pytest.mark.parametrize("code", sorted(GRAMMAR_FAILURES))
def test_a_grammar_failure_is_a_400_error_event(code: str) -> None:
    async def main() -> list[str]:
        source = FakeSource()
        source.push(Failed(code=code))
        return await drain(sse_stream([source], "req-1", PieceWriter()))

    frames = run(main)
    error = json.loads(frames[1].removeprefix("data: "))["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", code)
    assert error["message"] == GRAMMAR_FAILURES[code]
    assert frames[2:] == [DONE]


def test_an_engine_failure_names_the_request_not_the_cause() -> None:
    async def main() -> list[str]:
        source = FakeSource()
        source.push(Failed())
        return await drain(sse_stream([source], "req-42", PieceWriter()))

    error = json.loads(run(main)[1].removeprefix("data: "))["error"]
    assert error["type"] == "server_error"
    assert "req-42" in error["message"]


class BrokenSource(FakeSource):
    """A choice whose event iterator raises, or stops, before its Finished/Failed."""

    def __init__(self, error: Exception | None) -> None:
        super().__init__()
        self.error = error

    async def events(self) -> AsyncIterator[GenerationEvent]:
        yield TextDelta("partial")
        if self.error is not None:
            raise self.error


@pytest.mark.parametrize("error", [RuntimeError("engine gone"), None], ids=["raises", "stops"])
def test_a_choice_whose_events_break_off_fails_instead_of_hanging(
    error: Exception | None,
) -> None:
    async def main() -> tuple[list[str], list[FakeSource]]:
        sources = [BrokenSource(error), FakeSource()]
        sources[1].push(TextDelta("other"), STOP)
        return await drain(sse_stream(sources, "req-7", PieceWriter())), sources

    frames, sources = run(main)
    error_frame = json.loads(frames[-2].removeprefix("data: "))["error"]
    assert error_frame["type"] == "server_error" and "req-7" in error_frame["message"]
    assert frames[-1] == DONE
    assert all(s.cancelled for s in sources)


def test_run_to_end_fails_a_choice_whose_events_break_off() -> None:
    async def main() -> list[Finished]:
        return await run_to_end([BrokenSource(RuntimeError("gone"))], "req-8", lambda i, e: None)

    with pytest.raises(InternalServerError):
        run(main)


def test_closing_the_stream_early_cancels_and_closes_every_choice() -> None:
    async def main() -> list[FakeSource]:
        sources = [FakeSource(), FakeSource()]
        sources[0].push(TextDelta("a"))
        stream = sse_stream(sources, "req-1", PieceWriter())
        assert await take(stream, 2) == [
            frame(Piece(index=-1, text="open")),
            frame(Piece(index=0, text="a")),
        ]
        assert not any(s.cancelled for s in sources)
        await stream.aclose()  # what the server does when the client has gone
        await asyncio.sleep(0)
        return sources

    sources = run(main)
    assert all(s.cancelled for s in sources)
    assert all(s.closed for s in sources)


def test_cancelling_a_waiting_stream_cancels_every_choice() -> None:
    async def main() -> list[FakeSource]:
        sources = [FakeSource(), FakeSource()]
        stream = sse_stream(sources, "req-1", PieceWriter())
        consumer = asyncio.ensure_future(drain(stream))
        await asyncio.sleep(0.01)  # the consumer now waits for an event that never comes
        assert not consumer.done()
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer
        await asyncio.sleep(0)
        return sources

    sources = run(main)
    assert all(s.cancelled for s in sources)
    assert all(s.closed for s in sources)


def test_a_finished_stream_cancels_its_choices_too() -> None:
    # A no-op for a finished generation, but nothing may keep running after [DONE].
    async def main() -> FakeSource:
        source = FakeSource()
        source.push(STOP)
        await drain(sse_stream([source], "req-1", PieceWriter()))
        return source

    assert run(main).cancelled


def test_a_typed_stream_names_its_events_and_has_no_done() -> None:
    async def main() -> tuple[list[str], list[str]]:
        ok, bad = FakeSource(), FakeSource()
        ok.push(TextDelta("x"), STOP)
        bad.push(Failed(code="kv_cache_full"))
        return (
            await drain(sse_stream([ok], "req-1", TypedWriter())),
            await drain(sse_stream([bad], "req-1", TypedWriter())),
        )

    done, failed = run(main)
    assert done == [
        sse_frame(Piece(index=-1, text="open").model_dump_json(), "piece"),
        sse_frame(Piece(index=0, text="x").model_dump_json(), "piece"),
        sse_frame(Piece(index=0, text="<stop>").model_dump_json(), "piece"),
        sse_frame(Usage(completion_tokens=2).model_dump_json(), "usage"),
    ]
    assert failed[1].startswith('event: error\ndata: {"type": "error", "message": ')
    assert len(failed) == 2


def test_run_to_end_hands_every_event_over_and_returns_finishes_in_choice_order() -> None:
    first = Finished(finish_reason="length", prompt_tokens=5, completion_tokens=3)

    async def main() -> tuple[list[Finished], list[tuple[int, GenerationEvent]]]:
        sources = [FakeSource(), FakeSource()]
        sources[1].push(TextDelta("b"), STOP)
        sources[0].push(TextDelta("a"), first)
        seen: list[tuple[int, GenerationEvent]] = []
        ends = await run_to_end(sources, "req-1", lambda i, e: seen.append((i, e)))
        return ends, seen

    ends, seen = run(main)
    assert ends == [first, STOP]
    assert sorted(seen, key=lambda item: item[0]) == [
        (0, TextDelta("a")),
        (0, first),
        (1, TextDelta("b")),
        (1, STOP),
    ]


def test_run_to_end_raises_the_failure_and_cancels_the_other_choices() -> None:
    async def main() -> tuple[APIError, list[FakeSource]]:
        sources = [FakeSource(), FakeSource()]
        sources[1].push(Failed(code="grammar_dead_end"))
        with pytest.raises(APIError) as caught:
            await run_to_end(sources, "req-1", lambda i, e: None)
        await asyncio.sleep(0)
        return caught.value, sources

    error, sources = run(main)
    assert (error.status_code, error.code) == (400, "grammar_dead_end")
    assert all(s.cancelled for s in sources)
    assert sources[0].closed


# ---- the chat and text completion writers ---------------------------------------------

CHUNK_HEAD = '{"id":"chatcmpl-1","object":"chat.completion.chunk","created":7,"model":"m",'
CHUNK_TAIL = '"system_fingerprint":null,'


def chat_frame(choice: str) -> str:
    return f'data: {CHUNK_HEAD}{CHUNK_TAIL}"choices":[{choice}],"usage":null}}\n\n'


def test_chat_stream_bytes() -> None:
    """Two choices, reasoning then content, logprobs, usage: OpenAI's chunk shapes."""
    token = TokenLogprob(token=9, piece=b"Hi", logprob=-0.5, top=((b"Hi", -0.5),))

    async def main() -> list[str]:
        sources = [FakeSource(), FakeSource()]
        chunks = ChatChunks(
            "chatcmpl-1",
            7,
            "m",
            [ReplyParser(None, (), reasoning_open=False) for _ in sources],
            want_logprobs=True,
            include_usage=True,
        )
        stream = sse_stream(sources, "req-1", chunks)
        frames = await take(stream, 2)
        sources[0].push(TextDelta("Hi", (token,)), STOP)
        frames += await take(stream, 2)
        sources[1].push(Finished("length", prompt_tokens=5, completion_tokens=4))
        return frames + await drain(stream)

    lp = (
        '{"content":[{"token":"Hi","logprob":-0.5,"bytes":[72,105],'
        '"top_logprobs":[{"token":"Hi","logprob":-0.5,"bytes":[72,105]}]}],"refusal":null}'
    )
    assert run(main) == [
        chat_frame(
            '{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
            '"finish_reason":null}'
        ),
        chat_frame(
            '{"index":1,"delta":{"role":"assistant","content":""},"logprobs":null,'
            '"finish_reason":null}'
        ),
        chat_frame(
            f'{{"index":0,"delta":{{"content":"Hi"}},"logprobs":{lp},"finish_reason":null}}'
        ),
        chat_frame('{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}'),
        chat_frame('{"index":1,"delta":{},"logprobs":null,"finish_reason":"length"}'),
        f'data: {CHUNK_HEAD}{CHUNK_TAIL}"choices":[],"usage":{{"prompt_tokens":5,'
        '"completion_tokens":6,"total_tokens":11,"prompt_tokens_details":{"cached_tokens":1}}}\n\n',
        DONE,
    ]


def test_completion_stream_bytes_with_echo_and_logprobs() -> None:
    """The echoed prompt (with its logprobs, the first null) before the text, each text
    chunk with the logprobs of its own tokens, a finish chunk; no usage unless asked."""
    prompt_lp = PromptLogprobs(
        (TokenLogprob(1, b"A", None), TokenLogprob(2, b"B", -1.0, ((b"B", -1.0),)))
    )
    token = TokenLogprob(3, b"C", -2.0, ((b"C", -2.0),))

    async def main() -> list[str]:
        source = FakeSource()
        prepared = SimpleNamespace(
            completion_id="cmpl-1",
            created=7,
            served=SimpleNamespace(id="m"),
            parts=SimpleNamespace(system_fingerprint="fp_0123456789ab"),
            logprobs=1,
            include_usage=False,
            jobs=[[None]],
        )
        choices = [ChoiceAccumulator(Prompt([1, 2], "AB"), echo=True)]
        source.push(prompt_lp, TextDelta("C", (token,)), STOP)
        return await drain(sse_stream([source], "req-1", CompletionChunks(prepared, choices)))  # type: ignore[arg-type]

    head = '{"id":"cmpl-1","object":"text_completion","created":7,"model":"m",'
    head += '"system_fingerprint":"fp_0123456789ab","choices":['
    assert run(main) == [
        f'data: {head}{{"index":0,"text":"AB","logprobs":{{"text_offset":[0,1],'
        '"token_logprobs":[null,-1.0],"tokens":["A","B"],"top_logprobs":[null,{"B":-1.0}]},'
        '"finish_reason":null}],"usage":null}\n\n',
        f'data: {head}{{"index":0,"text":"C","logprobs":{{"text_offset":[2],'
        '"token_logprobs":[-2.0],"tokens":["C"],"top_logprobs":[{"C":-2.0}]},'
        '"finish_reason":null}],"usage":null}\n\n',
        f'data: {head}{{"index":0,"text":"","logprobs":null,"finish_reason":"stop"}}],'
        '"usage":null}\n\n',
        DONE,
    ]
