"""The per-sequence sampler on the bundled model, in-process: a lazy grammar starts at its
trigger, a trigger whose text the grammar refuses leaves the output free (llama.cpp's own
lazy sampler would abort the process there), and grammar checks never change an
unconstrained sample."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from ggufserve.engine.base import (
    Finished,
    GenerationRequest,
    GrammarSpec,
    SamplingParams,
    TextDelta,
)
from ggufserve.engine.llama import LlamaEngine

PROMPT = (
    "<bos><start_of_turn>user\nWhat is the weather in Paris?<end_of_turn>\n<start_of_turn>model\n"
)


@pytest.fixture(scope="module")
def engine(bundled_gguf: Path) -> Iterator[LlamaEngine]:
    engine = LlamaEngine(
        bundled_gguf,
        n_ctx=1024,
        n_parallel=2,
        n_gpu_layers=0,
        n_threads=2,
        n_batch=256,
        max_queued=4,
    )
    yield engine
    engine.close()


def sampling(temperature: float) -> SamplingParams:
    return SamplingParams(
        temperature=temperature,
        top_p=0.95,
        top_k=40,
        min_p=0.05,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        repeat_penalty=1.0,
        seed=3,
    )


def generate(engine: LlamaEngine, grammar: GrammarSpec | None, temperature: float = 0.7) -> str:
    async def run() -> str:
        request = GenerationRequest(
            engine.tokenize(PROMPT), 24, sampling(temperature), grammar=grammar
        )
        parts = []
        async for event in engine.submit(request).events():
            if isinstance(event, TextDelta):
                parts.append(event.text)
            assert not isinstance(event, Finished) or event.completion_tokens > 0
        return "".join(parts)

    return asyncio.run(run())


def test_untriggered_grammar_changes_nothing(engine: LlamaEngine) -> None:
    free = generate(engine, None)
    waiting = generate(engine, GrammarSpec('root ::= "x"', trigger_patterns=("(QQQZZ)",)))
    assert waiting == free


def test_trigger_starts_the_grammar(engine: LlamaEngine) -> None:
    free = generate(engine, None, temperature=0)
    word = free.split()[0]  # the model's first word, greedy
    grammar = GrammarSpec(f'root ::= "{word}" " ok" [.]', trigger_patterns=(f"({word})",))
    assert generate(engine, grammar, temperature=0) == f"{word} ok."


def test_trigger_text_the_grammar_refuses_leaves_output_free(engine: LlamaEngine) -> None:
    free = generate(engine, None, temperature=0)
    word = free.split()[0]
    # Triggers on the model's own text, which this grammar cannot start with.
    grammar = GrammarSpec('root ::= "{" [a-z]* "}"', trigger_patterns=(f"({word})",))
    assert generate(engine, grammar, temperature=0) == free


def test_required_grammar_from_the_first_token(engine: LlamaEngine) -> None:
    text = generate(engine, GrammarSpec('root ::= "yes" | "no"'), temperature=0.9)
    assert text in ("yes", "no")
