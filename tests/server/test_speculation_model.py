"""Prompt-lookup speculation on the bundled model, in-process: greedy output is the same
with and without it (plain, ``n`` = 2, logprobs, a JSON-schema grammar), drafts are made
and kept on a copy-heavy request, and sampled output keeps its distribution."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ggufserve.engine.base import (
    Finished,
    GenerationRequest,
    GrammarSpec,
    SamplingParams,
    TextDelta,
    TokenLogprob,
)
from ggufserve.engine.llama import LlamaEngine
from ggufserve.grammar.gbnf import json_schema_gbnf
from tests.bench.copy_heavy import COPY_REQUEST, FREE_REQUEST, gemma3_turn

GREEDY = SamplingParams(0.0, 1.0, 0, 0.0, 0.0, 0.0, 1.0, 0)
# Hot and narrow: the 3 likeliest tokens, flattened, so a draft token is drawn often but
# far from always (a rule that favoured drafts would show).
HOT = SamplingParams(2.0, 1.0, 3, 0.0, 0.0, 0.0, 1.0, 0)
# Batches of different row counts take different CPU matmul kernels, so logits differ in
# the last bits (logprobs by up to ~0.3 nats here) with or without drafts, exactly as they
# do between solo and batched decoding (tests/e2e/test_batching.py). Greedy outputs may
# then part only where the two best tokens are this close.
NEAR_TIE = 0.5
ROW_GAP_MAX, ROW_GAP_MEAN = 1.0, 0.2
JSON_REQUEST = (
    "Give the order below as JSON with the fields customer, city and items.\n\n"
    "Order 1182: customer Margaret Okonkwo-Lindqvist, city Port Elizabeth, items: "
    "stainless steel colander, cast iron skillet, bamboo cutting board, linen tea towels."
)
SCHEMA = {
    "type": "object",
    "properties": {
        "customer": {"type": "string"},
        "city": {"type": "string"},
        "items": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["customer", "city", "items"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine(bundled_gguf: Path) -> Iterator[LlamaEngine]:
    engine = LlamaEngine(
        bundled_gguf,
        n_ctx=4096,
        n_parallel=4,
        n_gpu_layers=0,
        n_threads=2,
        n_batch=512,
        max_queued=512,
    )
    yield engine
    engine.close()


def request(
    engine: LlamaEngine, content: str, max_tokens: int, **extra: object
) -> GenerationRequest:
    base = GenerationRequest(engine.tokenize(gemma3_turn(content)), max_tokens, GREEDY, logprobs=2)
    return replace(base, **extra)  # type: ignore[arg-type]


def run(engine: LlamaEngine, requests: list[GenerationRequest]) -> list[list[TokenLogprob]]:
    """Each request's sampled tokens with their logprobs (all submitted at once)."""

    async def collect(generation: object) -> list[TokenLogprob]:
        tokens: list[TokenLogprob] = []
        async for event in generation.events():  # type: ignore[attr-defined]
            if isinstance(event, TextDelta):
                tokens.extend(event.logprobs)
            assert not isinstance(event, Finished) or event.completion_tokens > 0
        return tokens

    async def all_of() -> list[list[TokenLogprob]]:
        generations = [engine.submit(r) for r in requests]
        return list(await asyncio.gather(*(collect(g) for g in generations)))

    return asyncio.run(all_of())


def assert_same_greedy(off: list[TokenLogprob], on: list[TokenLogprob]) -> int:
    """The two outputs agree token for token up to the first near-tie where they part;
    each kept token's logprob is its own row's. Returns how many tokens agree."""
    agree = next(
        (i for i, (a, b) in enumerate(zip(off, on, strict=False)) if a.token != b.token),
        min(len(off), len(on)),
    )
    if agree < min(len(off), len(on)):
        best, second = off[agree].top[0][1], off[agree].top[1][1]
        assert best - second < NEAR_TIE, f"parted at token {agree} with a margin of {best - second}"
    else:
        assert len(off) == len(on)
    gaps = []
    for a, b in zip(off[:agree], on[:agree], strict=True):
        assert a.logprob is not None and b.logprob is not None
        gaps.append(abs(a.logprob - b.logprob))
    # Rounding moves a token's logprob a little (measured: means 0.012 and 0.054, at most
    # 0.56 nats); another row's logits would put it nats away.
    if gaps:
        assert max(gaps) < ROW_GAP_MAX and float(np.mean(gaps)) < ROW_GAP_MEAN
    return agree


def spec_counts(engine: LlamaEngine) -> tuple[int, int]:
    return engine.stats.spec_drafted_tokens, engine.stats.spec_accepted_tokens


@pytest.mark.parametrize(("content", "max_tokens"), [(COPY_REQUEST, 160), (FREE_REQUEST, 48)])
def test_greedy_output_is_the_same_with_and_without_speculation(
    engine: LlamaEngine, content: str, max_tokens: int
) -> None:
    drafted, accepted = spec_counts(engine)
    (off,) = run(engine, [request(engine, content, max_tokens, speculative=False)])
    assert spec_counts(engine) == (drafted, accepted)  # the request turned it off
    (on,) = run(engine, [request(engine, content, max_tokens)])
    agree = assert_same_greedy(off, on)
    if content is COPY_REQUEST:
        new_drafted, new_accepted = spec_counts(engine)
        assert new_accepted - accepted > 0.3 * max_tokens  # most of the copy was drafted
        assert new_drafted >= new_accepted - accepted + drafted
        assert agree > 100


def two_choices(
    engine: LlamaEngine, max_tokens: int, speculative: bool
) -> list[list[TokenLogprob]]:
    """The tokens of the 2 greedy choices of one copy-heavy request (``n`` = 2)."""
    job = request(engine, COPY_REQUEST, max_tokens, speculative=speculative)

    async def both() -> list[list[TokenLogprob]]:
        out: list[list[TokenLogprob]] = [[], []]
        for i, generation in enumerate(engine.submit_choices([job, job])):
            async for event in generation.events():
                if isinstance(event, TextDelta):
                    out[i].extend(event.logprobs)
        return out

    return asyncio.run(both())


def test_greedy_choices_of_one_request_are_the_same_with_speculation(
    engine: LlamaEngine,
) -> None:
    before = spec_counts(engine)[1]
    off, on = two_choices(engine, 48, False), two_choices(engine, 48, True)
    assert spec_counts(engine)[1] > before
    for a, b in zip(off, on, strict=True):
        assert assert_same_greedy(a, b) > 0


def json_schema_greedy_counts(engine: LlamaEngine, max_tokens: int) -> tuple[int, int]:
    """Greedy JSON-schema output with and without speculation agrees (past 10 tokens);
    returns the (drafted, accepted) tokens of the speculative run."""
    spec = engine.compile_grammar(GrammarSpec(json_schema_gbnf(SCHEMA)))
    job = request(engine, JSON_REQUEST, max_tokens, grammar=spec)
    (off,) = run(engine, [replace(job, speculative=False)])
    before = spec_counts(engine)
    (on,) = run(engine, [job])
    assert assert_same_greedy(off, on) > 10
    drafted, accepted = (now - then for now, then in zip(spec_counts(engine), before, strict=True))
    return drafted, accepted


def test_greedy_output_under_a_json_schema_grammar_is_the_same(engine: LlamaEngine) -> None:
    drafted, accepted = json_schema_greedy_counts(engine, 96)
    assert drafted > 0 and accepted > 0  # the names were copied from the prompt


def pairs(engine: LlamaEngine, speculative: bool, seeds: range) -> list[tuple[int, int]]:
    """The 2nd and 3rd sampled tokens (the first ones a draft can hold) per seed."""
    prompt = engine.tokenize(gemma3_turn(COPY_REQUEST))
    jobs = [
        GenerationRequest(prompt, 4, replace(HOT, seed=seed), logprobs=0, speculative=speculative)
        for seed in seeds
    ]
    outputs = run(engine, jobs)
    return [(out[1].token, out[2].token) for out in outputs if len(out) >= 3]


def tv_permutation_p(a: list[tuple[int, int]], b: list[tuple[int, int]], rounds: int) -> float:
    """p-value of the total-variation distance between the two samples' pair frequencies,
    by label permutation (seeded)."""
    labels = {pair: i for i, pair in enumerate(Counter(a + b))}
    codes = np.array([labels[p] for p in a + b])
    n_a, n_cats = len(a), len(labels)

    def tv(order: np.ndarray) -> float:
        first = np.bincount(codes[order[:n_a]], minlength=n_cats) / n_a
        second = np.bincount(codes[order[n_a:]], minlength=n_cats) / (len(codes) - n_a)
        return 0.5 * float(np.abs(first - second).sum())

    observed = tv(np.arange(len(codes)))
    rng = np.random.default_rng(0)
    shuffled = [tv(rng.permutation(len(codes))) for _ in range(rounds)]
    return (1 + sum(s >= observed for s in shuffled)) / (1 + rounds)


def test_sampled_output_keeps_its_distribution(engine: LlamaEngine) -> None:
    """Temperature 2 over the top 3 tokens, distinct seeds on each side: the pairs of
    tokens that drafts cover are distributed alike. Accepting drafts without the sample
    check fails this (p < 1e-3; see docs/engine-and-performance.md)."""
    samples = 160
    before = spec_counts(engine)[0]
    off = pairs(engine, False, range(samples))
    on = pairs(engine, True, range(samples, 2 * samples))
    assert spec_counts(engine)[0] - before > samples / 2  # drafts were made and checked
    assert min(len(off), len(on)) > 0.9 * samples  # few end before their 3rd token
    assert len(set(off)) > 1  # a distribution, not one forced answer
    p = tv_permutation_p(off, on, rounds=2000)
    assert p > 1e-3


def test_a_stop_string_inside_drafted_text_ends_the_output_where_it_would(
    engine: LlamaEngine,
) -> None:
    (full,) = run(engine, [request(engine, COPY_REQUEST, 120, speculative=False)])
    whole = b"".join(t.piece for t in full).decode()
    stop = "def total"  # copied text, well inside the drafts
    assert whole.index(stop) > 40
    before = spec_counts(engine)[1]

    async def stopped() -> tuple[str, Finished]:
        job = request(engine, COPY_REQUEST, 120, stop=[stop])
        parts, end = [], None
        async for event in engine.submit(job).events():
            if isinstance(event, TextDelta):
                parts.append(event.text)
            elif isinstance(event, Finished):
                end = event
        assert end is not None
        return "".join(parts), end

    text, end = asyncio.run(stopped())
    assert text == whole[: whole.index(stop)]
    assert end.finish_reason == "stop"
    assert spec_counts(engine)[1] > before
