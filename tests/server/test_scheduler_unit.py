"""The continuous-batching scheduler driven in-process with fake decode and KV calls (no
model): admission order, one decode for every generating sequence, chunked prefill,
cancellation, failing steps, prefix reuse and shutdown."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
import numpy as np
import pytest

from ggufserve.engine.base import (
    EngineStats,
    Failed,
    Finished,
    GenerationEvent,
    GenerationRequest,
    SamplingParams,
    TextDelta,
)
from ggufserve.engine.sampling import GrammarFailure
from ggufserve.engine.scheduler import KV_FULL, ContextLimits, Scheduler
from ggufserve.engine.sequence import ImageDecodeError, ImagePiece, Piece, Running
from ggufserve.engine.speculative import SpecConfig
from ggufserve.engine.text import StopScanner
from ggufserve.engine.worker import EngineBusy, EngineClosed, Generation

EOG = 2
IMAGE_AT, IMAGE_ROWS = 99, 3
GREEDY = SamplingParams(1.0, 1.0, 0, 0.0, 0.0, 0.0, 1.0, 0)
WAIT_S = 10  # generous: the fake decode is instant, but the test machine may be busy


@dataclass(frozen=True)
class Row:
    """One row of a decoded batch."""

    seq_id: int
    pos: int
    token: int
    output: bool


class FakeContext:
    """``ContextOps`` without llama.cpp: records every batch and KV edit; ``outcome`` picks
    each decode's status from its rows (or raises)."""

    def __init__(self) -> None:
        self.batches: list[list[Row]] = []
        self.removed: list[tuple[int, int, int]] = []
        self.copied: list[tuple[int, int, int, int]] = []
        self.outcome: Callable[[list[Row]], int] = lambda rows: 0

    def decode(self, batch: llama_cpp.llama_batch) -> int:
        rows = [
            Row(batch.seq_id[i][0], batch.pos[i], batch.token[i], bool(batch.logits[i]))
            for i in range(batch.n_tokens)
        ]
        self.batches.append(rows)
        return self.outcome(rows)

    def seq_rm(self, seq_id: int, p0: int, p1: int) -> bool:
        self.removed.append((seq_id, p0, p1))
        return True

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        self.copied.append((src, dst, p0, p1))

    def seq_pos_min(self, seq_id: int) -> int:
        return 0

    def logits(self, row: int) -> np.ndarray:
        return np.full(4, float(row), dtype=np.float32)


@dataclass
class FakeSampler:
    """Returns its script's tokens in turn (EOG after the last); an exception in the script
    is raised instead; ``hold`` blocks the owner thread before the given (1-based) sample
    until the event is set."""

    script: list[int | Exception]
    hold: tuple[int, threading.Event] | None = None
    calls: int = 0
    saved: int = 0  # samples taken from kept logits (a repeated prompt)
    closed: bool = False

    def sample(self, ctx: Any, row: int, saved: np.ndarray | None = None) -> int:
        self.calls += 1
        self.saved += saved is not None
        if self.hold is not None and self.calls == self.hold[0]:
            assert self.hold[1].wait(WAIT_S)
        if self.calls > len(self.script):
            return EOG
        token = self.script[self.calls - 1]
        if isinstance(token, Exception):
            raise token
        return token

    def close(self) -> None:
        self.closed = True


@dataclass
class Harness:
    """A scheduler over a :class:`FakeContext`; token ``t`` (not EOG) reads ``<t>``."""

    limits: ContextLimits
    max_queued: int = 8
    fake: FakeContext = field(default_factory=FakeContext)
    samplers: dict[Generation, FakeSampler] = field(default_factory=dict)
    started: list[str] = field(default_factory=list)
    names: dict[Generation, str] = field(default_factory=dict)
    stats: EngineStats = field(default_factory=EngineStats)
    speculation: SpecConfig | None = None
    # Prompts holding IMAGE_AT get an image of IMAGE_ROWS rows there; each image decode
    # takes the next status (0: decoded), none left fails the test.
    image_statuses: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.scheduler = Scheduler(
            None,  # type: ignore[arg-type]  # only samplers and logprobs read the context
            self.limits,
            start=self.start,
            piece=lambda token: f"<{token}>".encode(),
            shown_piece=lambda token: f"<{token}>".encode(),
            is_eog=lambda token: token == EOG,
            decode_image=self.decode_image,
            stats=self.stats,
            max_queued=self.max_queued,
            name="fake-scheduler",
            ops=self.fake,
            speculation=self.speculation,
        )

    def start(self, generation: Generation) -> Running:
        self.started.append(self.names[generation])
        prompt = list(generation.request.prompt_tokens)
        pieces: deque[Piece] = deque([prompt])
        if IMAGE_AT in prompt:
            at = prompt.index(IMAGE_AT)
            done: Future[Any] = Future()
            done.set_result(None)
            pieces = deque([prompt[:at], ImagePiece(None, IMAGE_ROWS, done), prompt[at + 1 :]])
        return Running(
            generation=generation,
            pieces=pieces,
            sampler=self.samplers[generation],  # type: ignore[arg-type]
            scanner=StopScanner(generation.request.stop),
            n_prompt=len(prompt),
            n_cached=0,
        )

    def decode_image(self, piece: ImagePiece, seq_id: int, n_past: int) -> int:
        assert self.image_statuses, "no image decode expected"
        if status := self.image_statuses.pop(0):
            raise ImageDecodeError(status)
        return n_past + piece.n_tokens

    def generation(
        self,
        name: str,
        prompt: list[int],
        script: list[int | Exception],
        *,
        max_tokens: int = 16,
        stop: list[str] | None = None,
        hold: tuple[int, threading.Event] | None = None,
        speculative: bool = True,
    ) -> Generation:
        request = GenerationRequest(
            prompt, max_tokens, GREEDY, stop=stop or [], speculative=speculative
        )
        generation = Generation(request, asyncio.get_running_loop())
        self.samplers[generation] = FakeSampler(script, hold)
        self.names[generation] = name
        return generation

    def rows_of(self, seq_id: int) -> list[Row]:
        return [row for batch in self.fake.batches for row in batch if row.seq_id == seq_id]


def limits(n_parallel: int, *, n_batch: int = 64, prefill_chunk: int = 64) -> ContextLimits:
    return ContextLimits(
        n_parallel=n_parallel,
        n_batch=n_batch,
        prefill_chunk=prefill_chunk,
        n_swa=0,
        swa_full=True,
        n_outputs_max=2 * n_parallel + 8,
        n_vocab=100,
    )


@pytest.fixture
def make() -> Iterator[Callable[..., Harness]]:
    """Build harnesses; each scheduler is closed (and its thread joined) afterwards."""
    made: list[Harness] = []

    def build(n_parallel: int, **kwargs: Any) -> Harness:
        max_queued = kwargs.pop("max_queued", 8)
        speculation = kwargs.pop("speculation", None)
        made.append(
            Harness(limits(n_parallel, **kwargs), max_queued=max_queued, speculation=speculation)
        )
        return made[-1]

    yield build
    for harness in made:
        assert harness.scheduler.close(drain_s=WAIT_S)


async def events(generation: Generation) -> list[GenerationEvent]:
    return [event async for event in generation.events()]


async def finish(*generations: Generation) -> list[list[GenerationEvent]]:
    return await asyncio.wait_for(asyncio.gather(*(events(g) for g in generations)), WAIT_S)


def text(found: list[GenerationEvent]) -> str:
    return "".join(event.text for event in found if isinstance(event, TextDelta))


def test_generations_are_admitted_in_submission_order(make: Callable[..., Harness]) -> None:
    harness = make(2)

    async def scenario() -> list[list[GenerationEvent]]:
        gate = threading.Event()
        first = harness.generation("a", [10, 11, 12], [20, 21], hold=(1, gate))
        # Prompts share no prefix, so no admission reuses another's cache.
        rest = [harness.generation(n, [30 + i, 40], [22]) for i, n in enumerate("bcde")]
        harness.scheduler.submit(first)
        harness.scheduler.submit(rest[0])
        harness.scheduler.submit(*rest[1:])
        gate.set()
        return await finish(first, *rest)

    found = asyncio.run(scenario())
    assert harness.scheduler.close(drain_s=WAIT_S)  # the thread has released every sequence
    assert harness.started == ["a", "b", "c", "d", "e"]
    assert text(found[0]) == "<20><21>"
    assert [text(f) for f in found[1:]] == ["<22>"] * 4
    assert all(f[-1] == Finished("stop", 2, 1, 0) for f in found[1:])
    assert found[0][-1] == Finished("stop", 3, 2, 0)
    assert harness.scheduler.counts() == (0, 0)
    assert all(sampler.closed for sampler in harness.samplers.values())


def test_one_decode_holds_a_token_for_every_generating_sequence(
    make: Callable[..., Harness],
) -> None:
    harness = make(3)
    prompts = {"a": [10, 11, 12, 13], "b": [20, 21, 22, 23], "c": [30, 31, 32, 33]}

    async def scenario() -> list[list[GenerationEvent]]:
        generations = [
            harness.generation(name, prompt, [40 + i, 50 + i, 60 + i], max_tokens=3)
            for i, (name, prompt) in enumerate(prompts.items())
        ]
        harness.scheduler.submit(*generations)
        return await finish(*generations)

    found = asyncio.run(scenario())
    assert [f[-1] for f in found] == [Finished("length", 4, 3, 0)] * 3
    batches = harness.fake.batches
    # The prompts together (an output row at each one's end), then 2 steps of one sampled
    # token per sequence: 3 decodes for 3 × (4 prompt + 3 sampled) tokens.
    assert [len(batch) for batch in batches] == [12, 3, 3]
    assert [row.pos for row in batches[0] if row.output] == [3, 3, 3]
    for batch in batches[1:]:
        assert sorted(row.seq_id for row in batch) == [0, 1, 2]
        assert all(row.output for row in batch)
    assert [row.token for row in batches[1]] == [40, 41, 42]
    for seq_id, prompt in enumerate(prompts.values()):
        rows = harness.rows_of(seq_id)
        assert [row.pos for row in rows] == list(range(6))
        assert [row.token for row in rows] == [*prompt, 40 + seq_id, 50 + seq_id]


def test_a_long_prompt_is_prefilled_in_chunks_while_another_sequence_generates(
    make: Callable[..., Harness],
) -> None:
    harness = make(2, n_batch=64, prefill_chunk=8)
    long_prompt = list(range(100, 130))

    async def scenario() -> list[list[GenerationEvent]]:
        gate = threading.Event()
        running = harness.generation("a", [10, 11], [20] * 40, max_tokens=40, hold=(3, gate))
        harness.scheduler.submit(running)
        while harness.scheduler.counts()[0] == 0 or harness.samplers[running].calls < 3:
            await asyncio.sleep(0.001)
        late = harness.generation("b", long_prompt, [21], max_tokens=1)
        harness.scheduler.submit(late)
        gate.set()
        return await finish(running, late)

    found = asyncio.run(scenario())
    assert found[0][-1] == Finished("length", 2, 40, 0)
    assert found[1][-1] == Finished("length", 30, 1, 0)
    with_late = [batch for batch in harness.fake.batches if any(r.seq_id == 1 for r in batch)]
    prefill = [[r for r in batch if r.seq_id == 1] for batch in with_late]
    # 30 tokens in chunks of at most 8 beside the generating sequence.
    assert [len(rows) for rows in prefill] == [8, 8, 8, 6]
    assert all(any(r.seq_id == 0 for r in batch) for batch in with_late)
    assert [r.token for rows in prefill for r in rows] == long_prompt


def test_a_cancelled_generation_leaves_its_sequence_to_the_next(
    make: Callable[..., Harness],
) -> None:
    harness = make(1)

    async def scenario() -> tuple[Generation, GenerationEvent, list[GenerationEvent]]:
        endless = harness.generation("a", [10, 11], [20] * 10_000, max_tokens=10_000)
        harness.scheduler.submit(endless)
        first = await anext(aiter(endless.events()))
        endless.cancel()
        following = harness.generation("b", [12, 13], [21])
        harness.scheduler.submit(following)
        (after,) = await finish(following)
        return endless, first, after

    endless, first, after = asyncio.run(scenario())
    assert isinstance(first, TextDelta)
    assert harness.stats.requests_cancelled == 1
    assert harness.samplers[endless].closed
    assert after[-1] == Finished("stop", 2, 1, 0)
    assert harness.started == ["a", "b"]  # b got the only sequence: a no longer held it
    assert harness.samplers[endless].calls < 10_000


def test_a_generation_cancelled_while_waiting_never_starts(make: Callable[..., Harness]) -> None:
    harness = make(1)

    async def scenario() -> list[list[GenerationEvent]]:
        gate = threading.Event()
        first = harness.generation("a", [10, 11], [20, 21], hold=(1, gate))
        skipped = harness.generation("b", [12, 13], [22])
        last = harness.generation("c", [14, 15], [23])
        harness.scheduler.submit(first)
        harness.scheduler.submit(skipped, last)
        skipped.cancel()
        gate.set()
        return await finish(first, last)

    found = asyncio.run(scenario())
    assert harness.started == ["a", "c"]
    assert [text(f) for f in found] == ["<20><21>", "<23>"]
    assert harness.stats.requests_cancelled == 0  # it never ran


def test_a_failing_decode_fails_the_generations_in_the_batch_and_the_next_one_runs(
    make: Callable[..., Harness],
) -> None:
    harness = make(2)
    harness.fake.outcome = lambda rows: -3 if len(harness.fake.batches) == 1 else 0

    async def scenario() -> tuple[list[list[GenerationEvent]], list[list[GenerationEvent]]]:
        pair = [harness.generation(n, [10, 11, 12], [20, 21]) for n in ("a", "b")]
        harness.scheduler.submit(*pair)
        failed = await finish(*pair)
        later = harness.generation("c", [13, 14], [22])
        harness.scheduler.submit(later)
        return failed, await finish(later)

    failed, (after,) = asyncio.run(scenario())
    assert failed == [[Failed()], [Failed()]]
    # Cleared when admitted, then again when failed: the failed cells are not kept.
    assert harness.fake.removed[:4] == [(0, 0, -1), (1, 0, -1), (0, 0, -1), (1, 0, -1)]
    assert after[-1] == Finished("stop", 2, 1, 0)
    assert harness.scheduler.close(drain_s=WAIT_S)
    assert harness.scheduler.counts() == (0, 0)


def test_an_exception_in_a_step_fails_the_running_and_the_thread_goes_on(
    make: Callable[..., Harness],
) -> None:
    harness = make(2)

    def outcome(rows: list[Row]) -> int:
        if len(harness.fake.batches) == 2:
            raise RuntimeError("decode blew up")
        return 0

    harness.fake.outcome = outcome

    async def scenario() -> tuple[list[list[GenerationEvent]], list[list[GenerationEvent]]]:
        pair = [harness.generation(n, [10, 11, 12], [20, 21, 23]) for n in ("a", "b")]
        harness.scheduler.submit(*pair)
        failed = await finish(*pair)
        later = harness.generation("c", [13, 14], [22])
        harness.scheduler.submit(later)
        return failed, await finish(later)

    failed, (after,) = asyncio.run(scenario())
    assert [f[-1] for f in failed] == [Failed(), Failed()]
    assert [text(f) for f in failed] == ["<20>", "<20>"]  # what came before the failure
    assert after[-1] == Finished("stop", 2, 1, 0)


def test_a_full_kv_cache_fails_the_youngest_generation_only(
    make: Callable[..., Harness],
) -> None:
    harness = make(2)
    full_once = threading.Event()

    def outcome(rows: list[Row]) -> int:
        if any(row.seq_id == 1 for row in rows) and not full_once.is_set():
            full_once.set()
            return KV_FULL
        return 0

    harness.fake.outcome = outcome

    async def scenario() -> list[list[GenerationEvent]]:
        gate = threading.Event()
        older = harness.generation("a", [10, 11], [20, 21, 22], max_tokens=3, hold=(2, gate))
        harness.scheduler.submit(older)
        while harness.samplers[older].calls < 2:
            await asyncio.sleep(0.001)
        younger = harness.generation("b", [12, 13], [23])
        harness.scheduler.submit(younger)
        gate.set()
        return await finish(older, younger)

    older, younger = asyncio.run(scenario())
    assert younger == [Failed(code="kv_cache_full")]
    assert older[-1] == Finished("length", 2, 3, 0)
    assert text(older) == "<20><21><22>"


def test_a_full_kv_cache_drops_idle_caches_before_failing_anyone(
    make: Callable[..., Harness],
) -> None:
    harness = make(2)
    statuses = [KV_FULL]  # the first decode after the idle cache exists, then success

    async def scenario() -> list[list[GenerationEvent]]:
        done = harness.generation("a", [10, 11], [20])
        harness.scheduler.submit(done)
        await finish(done)  # leaves its cache on sequence 0
        harness.fake.removed.clear()
        harness.fake.outcome = lambda rows: statuses.pop() if statuses else 0
        retried = harness.generation("b", [30, 31, 32], [21])
        harness.scheduler.submit(retried)
        return await finish(retried)

    (retried,) = asyncio.run(scenario())
    assert retried[-1] == Finished("stop", 3, 1, 0)
    # b went to the empty sequence 1; the full cache then dropped idle sequence 0's cells.
    assert harness.fake.removed == [(1, 0, -1), (0, 0, -1)]


def test_a_grammar_failure_ends_only_its_own_sequence(make: Callable[..., Harness]) -> None:
    harness = make(2)

    async def scenario() -> list[list[GenerationEvent]]:
        bad = harness.generation("a", [10, 11], [20, GrammarFailure("no token fits")])
        good = harness.generation("b", [12, 13], [21, 22, 23], max_tokens=3)
        harness.scheduler.submit(bad, good)
        return await finish(bad, good)

    bad, good = asyncio.run(scenario())
    assert bad[-1] == Failed(code="grammar_failed")
    assert good[-1] == Finished("length", 2, 3, 0)


def test_an_image_without_kv_cells_drops_idle_caches_then_fails_as_kv_full(
    make: Callable[..., Harness],
) -> None:
    harness = make(2)
    harness.image_statuses = [KV_FULL, 0, KV_FULL, KV_FULL]

    async def scenario() -> list[list[GenerationEvent]]:
        idle = harness.generation("a", [30, 31, 32], [20], max_tokens=1)
        harness.scheduler.submit(idle)
        await finish(idle)
        fits = harness.generation("b", [10, IMAGE_AT, 11], [21], max_tokens=1)
        harness.scheduler.submit(fits)
        found = await finish(fits)
        never = harness.generation("c", [12, IMAGE_AT, 13], [22], max_tokens=1)
        harness.scheduler.submit(never)
        return [*found, *(await finish(never))]

    fits, never = asyncio.run(scenario())
    # The first image fit once the idle cache of "a" (sequence 0) was dropped.
    assert fits[-1] == Finished("length", 3, 1, 0)
    assert (0, 0, -1) in harness.fake.removed
    # With nothing idle left to drop, the second fails as a full cache (503), not a 500.
    assert never == [Failed(code="kv_cache_full")]
    assert harness.image_statuses == []


def test_a_shared_prompt_prefix_is_reused_in_place(make: Callable[..., Harness]) -> None:
    harness = make(1)
    prompt = [10, 11, 12, 13, 14]

    async def scenario() -> list[list[GenerationEvent]]:
        first = harness.generation("a", prompt, [20])
        harness.scheduler.submit(first)
        await finish(first)
        harness.fake.batches.clear()
        second = harness.generation("b", [*prompt, 15, 16], [21])
        harness.scheduler.submit(second)
        return await finish(second)

    (second,) = asyncio.run(scenario())
    assert second[-1] == Finished("stop", 7, 1, 5)
    assert (0, 5, -1) in harness.fake.removed  # cells past the shared prefix dropped
    # The prompt's new tokens at 5 and 6, then the sampled one at 7.
    assert [row.pos for row in harness.rows_of(0)] == [5, 6, 7]
    assert harness.stats.prompt_tokens_reused == 5


def test_a_repeated_prompt_samples_its_first_token_from_the_kept_logits(
    make: Callable[..., Harness],
) -> None:
    harness = make(2)
    prompt = [10, 11, 12, 13, 14]

    async def scenario() -> list[list[GenerationEvent]]:
        first = harness.generation("a", prompt, [20, 21], max_tokens=2)
        harness.scheduler.submit(first)
        await finish(first)
        harness.fake.batches.clear()
        again = harness.generation("b", prompt, [22, 23], max_tokens=2)
        longer = harness.generation("c", [*prompt, 15], [24], max_tokens=1)
        harness.scheduler.submit(again)
        found = await finish(again)
        harness.scheduler.submit(longer)
        return [*found, *(await finish(longer))]

    again, longer = asyncio.run(scenario())
    assert again[-1] == Finished("length", 5, 2, 5)  # every prompt cell reused
    generations = list(harness.samplers)
    assert [harness.samplers[g].saved for g in generations] == [0, 1, 0]
    # The repeat decoded no prompt row: only its first sample, at position 5.
    first_batch = harness.fake.batches[0]
    assert [(row.pos, row.token, row.output) for row in first_batch] == [(5, 22, True)]
    # A prompt that extends it is decoded past the shared prefix, its logits fresh.
    assert longer[-1] == Finished("length", 6, 1, 5)
    assert harness.stats.prompt_tokens_reused == 10


def test_kept_logits_are_forgotten_when_their_cells_go(make: Callable[..., Harness]) -> None:
    harness = make(2)
    prompt = [10, 11, 12, 13]

    async def scenario() -> list[list[GenerationEvent]]:
        first = harness.generation("a", prompt, [20], max_tokens=1)
        harness.scheduler.submit(first)
        await finish(first)
        other = harness.generation("b", [10, 11, 30], [21], max_tokens=1)
        harness.scheduler.submit(other)  # reuses [10, 11] in place, drops the rest
        await finish(other)
        again = harness.generation("c", prompt, [22], max_tokens=1)
        harness.scheduler.submit(again)
        return await finish(again)

    (again,) = asyncio.run(scenario())
    assert harness.fake.copied == []
    assert [harness.samplers[g].saved for g in harness.samplers] == [0, 0, 0]
    assert again[-1] == Finished("length", 4, 1, 2)


def test_a_stop_string_ends_the_generation_before_it(make: Callable[..., Harness]) -> None:
    harness = make(1)

    async def scenario() -> list[list[GenerationEvent]]:
        generation = harness.generation("a", [10, 11], [20, 21, 22, 23], stop=["<22>"])
        harness.scheduler.submit(generation)
        return await finish(generation)

    (found,) = asyncio.run(scenario())
    assert text(found) == "<20><21>"
    assert found[-1] == Finished("stop", 2, 3, 0, stop_sequence="<22>")


def test_a_full_queue_refuses_and_close_fails_the_waiting(make: Callable[..., Harness]) -> None:
    harness = make(1, max_queued=1)

    async def scenario() -> tuple[list[GenerationEvent], list[GenerationEvent], bool]:
        gate = threading.Event()
        running = harness.generation("a", [10, 11], [20] * 100, max_tokens=100, hold=(1, gate))
        waiting = harness.generation("b", [12, 13], [21])
        harness.scheduler.submit(running)
        while harness.samplers[running].calls == 0:
            await asyncio.sleep(0.001)
        harness.scheduler.submit(waiting)
        with pytest.raises(EngineBusy) as busy:
            harness.scheduler.submit(harness.generation("c", [14], [22]))
        assert busy.value.retry_after_s >= 1
        closing = asyncio.get_running_loop().run_in_executor(None, harness.scheduler.close, 5.0)
        (refused,) = await finish(waiting)  # close() has begun: the waiting are failed
        gate.set()
        (drained,) = await finish(running)
        return refused, drained, await closing

    refused, drained, stopped = asyncio.run(scenario())
    assert stopped
    assert refused == [Failed()]
    assert drained[-1] == Finished("length", 2, 100, 0)  # running work drains
    assert harness.started == ["a"]
    with pytest.raises(EngineClosed):
        harness.scheduler.submit()
