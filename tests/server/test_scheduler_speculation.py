"""Speculation in the scheduler, driven with the fake context of test_scheduler_unit (no
model): drafts decoded with the sequence's token, kept while the sampler draws them, the
rest of their cells dropped; stops, ``max_tokens`` and cancellation inside a draft; a
full KV cache; drafts only in the room prompt chunks leave."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from ggufserve.engine.base import Finished, GenerationEvent
from ggufserve.engine.scheduler import KV_FULL
from ggufserve.engine.speculative import SpecConfig
from tests.server.test_scheduler_unit import Harness, Row, finish, make, text

__all__ = ["make"]  # the fixture, shared with test_scheduler_unit

SPEC = SpecConfig(n_max=4, min_key=2, max_key=8)
# After the first sampled token (12) the tail [10, 11, 12] matches the prompt's start, so
# the draft is what followed there: 13, 14, 10, 11.
PROMPT = [10, 11, 12, 13, 14, 10, 11]
CYCLE = [12, 13, 14, 10, 11] * 4


def run(harness: Harness, script: list[int | Exception], **kwargs: object) -> list[GenerationEvent]:
    async def scenario() -> list[GenerationEvent]:
        generation = harness.generation("a", PROMPT, script, **kwargs)  # type: ignore[arg-type]
        harness.scheduler.submit(generation)
        (found,) = await finish(generation)
        return found

    return asyncio.run(scenario())


def generating_batches(harness: Harness) -> list[list[Row]]:
    """The batches after the prompt's (every row past the prompt's positions)."""
    return [batch for batch in harness.fake.batches if batch[0].pos >= len(PROMPT)]


def test_an_accepted_draft_gives_several_tokens_in_one_decode(make: Callable[..., Harness]) -> None:
    harness = make(1, speculation=SPEC)
    found = run(harness, CYCLE, max_tokens=6)
    assert text(found) == "<12><13><14><10><11><12>"
    assert found[-1] == Finished("length", 7, 6, 0)
    (verify,) = generating_batches(harness)
    assert [row.token for row in verify] == [12, 13, 14, 10, 11]
    assert [row.pos for row in verify] == [7, 8, 9, 10, 11]
    assert all(row.output for row in verify)
    assert (harness.stats.spec_drafted_tokens, harness.stats.spec_accepted_tokens) == (4, 4)
    assert harness.samplers[next(iter(harness.samplers))].calls == 6


def test_the_same_output_without_speculation(make: Callable[..., Harness]) -> None:
    plain = make(1)
    off = make(1, speculation=SPEC)
    for harness, kwargs in ((plain, {}), (off, {"speculative": False})):
        found = run(harness, CYCLE, max_tokens=6, **kwargs)
        assert text(found) == "<12><13><14><10><11><12>"
        assert found[-1] == Finished("length", 7, 6, 0)
        # One row per step once the prompt is in: the request turned drafts off.
        assert all(len(batch) == 1 for batch in generating_batches(harness))
        assert harness.stats.spec_drafted_tokens == 0


def test_a_draft_never_passes_max_tokens(make: Callable[..., Harness]) -> None:
    harness = make(1, speculation=SPEC)
    found = run(harness, CYCLE, max_tokens=4)
    assert text(found) == "<12><13><14><10>"
    assert found[-1] == Finished("length", 7, 4, 0)
    # 3 tokens left after the first: a draft of 2, whose bonus sample is the 4th token.
    assert [[row.token for row in batch] for batch in generating_batches(harness)] == [[12, 13, 14]]


def test_a_mismatch_keeps_the_correction_and_drops_the_rejected_cells(
    make: Callable[..., Harness],
) -> None:
    harness = make(1, speculation=SPEC)
    found = run(harness, [12, 13, 99, 50, 51], max_tokens=5)
    assert text(found) == "<12><13><99><50><51>"
    assert found[-1] == Finished("length", 7, 5, 0)
    batches = generating_batches(harness)
    # Draft 13, 14, 10 (3 tokens left); 13 kept, 99 drawn instead of 14: cells 9.. go.
    assert [[(row.token, row.pos) for row in batch] for batch in batches] == [
        [(12, 7), (13, 8), (14, 9), (10, 10)],
        [(99, 9)],
        [(50, 10)],
    ]
    assert (0, 9, -1) in harness.fake.removed
    assert (harness.stats.spec_drafted_tokens, harness.stats.spec_accepted_tokens) == (3, 1)


def test_a_stop_string_inside_an_accepted_draft_ends_the_output_there(
    make: Callable[..., Harness],
) -> None:
    harness = make(1, speculation=SPEC)
    found = run(harness, CYCLE, stop=["<14>"])
    assert text(found) == "<12><13>"
    assert found[-1] == Finished("stop", 7, 3, 0, stop_sequence="<14>")
    sampler = next(iter(harness.samplers.values()))
    assert sampler.calls == 3  # nothing sampled past the stop
    # Rows 12, 13, 14 stay cached (positions 7-9); the unverified 10, 11 are dropped.
    assert (0, 10, -1) in harness.fake.removed
    assert harness.scheduler.kv_tokens() == 10


def test_cancelling_during_a_draft_stops_at_the_next_draft_token(
    make: Callable[..., Harness],
) -> None:
    harness = make(1, speculation=SPEC)

    async def scenario() -> list[GenerationEvent]:
        gate = threading.Event()
        # Sample 3 is the draft's second row: the client leaves while it is drawn.
        cancelled = harness.generation("a", PROMPT, CYCLE, max_tokens=16, hold=(3, gate))
        harness.scheduler.submit(cancelled)
        while harness.samplers[cancelled].calls < 3:
            await asyncio.sleep(0.001)
        cancelled.cancel()
        gate.set()
        following = harness.generation("b", [60, 61], [62])
        harness.scheduler.submit(following)
        (after,) = await finish(following)
        assert harness.samplers[cancelled].calls == 3
        return after

    after = asyncio.run(scenario())
    assert after[-1] == Finished("stop", 2, 1, 0)
    assert harness.stats.requests_cancelled == 1
    # 13 and 14 were kept (cells up to 9); the draft's 10, 11 never checked are dropped.
    assert (0, 10, -1) in harness.fake.removed
    assert harness.stats.spec_accepted_tokens == 2


def test_a_full_kv_cache_retries_without_drafts_and_fails_nobody(
    make: Callable[..., Harness],
) -> None:
    harness = make(1, speculation=SPEC)
    refused = threading.Event()

    def outcome(rows: list[Row]) -> int:
        if len(rows) > 1 and rows[0].pos >= len(PROMPT) and not refused.is_set():
            refused.set()
            return KV_FULL
        return 0

    harness.fake.outcome = outcome
    found = run(harness, CYCLE, max_tokens=8)
    assert refused.is_set()
    assert text(found) == "<12><13><14><10><11><12><13><14>"
    assert found[-1] == Finished("length", 7, 8, 0)
    sizes = [len(batch) for batch in generating_batches(harness)]
    assert sizes[:2] == [5, 1]  # the refused draft, then the same step without it
    assert max(sizes[2:]) > 1  # drafts again afterwards


def prefill_sizes(harness: Harness) -> tuple[list[int], int]:
    """Sequence 1's prompt chunk sizes and the largest batch, for a drafting sequence 0
    beside a long prompt on sequence 1."""

    async def scenario() -> None:
        drafting = harness.generation("a", PROMPT, CYCLE, max_tokens=12)
        late = harness.generation("b", list(range(100, 120)), [21], max_tokens=1)
        harness.scheduler.submit(drafting, late)
        await finish(drafting, late)

    asyncio.run(scenario())
    sizes = [
        sum(1 for row in batch if row.seq_id == 1 and row.pos < 20)
        for batch in harness.fake.batches
    ]
    return [size for size in sizes if size], max(len(batch) for batch in harness.fake.batches)


def test_drafts_only_use_the_room_prompt_chunks_leave(make: Callable[..., Harness]) -> None:
    chunks_plain, _ = prefill_sizes(make(2, n_batch=6, prefill_chunk=6))
    spec = make(2, n_batch=6, prefill_chunk=6, speculation=SPEC)
    chunks_spec, widest = prefill_sizes(spec)
    assert chunks_spec == chunks_plain
    assert widest <= 6
    assert spec.stats.spec_accepted_tokens > 0
