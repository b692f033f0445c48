"""The per-sequence sampler on the bundled model, in-process: a lazy grammar starts at its
trigger, a trigger whose text the grammar refuses leaves the output free (llama.cpp's own
lazy sampler would abort the process there), and grammar checks never change an
unconstrained sample."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ggufserve.engine.base import (
    Finished,
    GenerationRequest,
    GrammarSpec,
    SamplingParams,
    TextDelta,
)
from ggufserve.engine.llama import LlamaEngine
from ggufserve.engine.sampling import CompiledGrammar, GrammarError

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


def choices(engine: LlamaEngine, grammar: GrammarSpec, n: int) -> list[str]:
    """``n`` choices of one request (``submit_choices``), seeds 0..n-1, sharing ``grammar``."""

    async def run() -> list[str]:
        prompt = engine.tokenize(PROMPT)
        requests = [
            GenerationRequest(prompt, 24, replace(sampling(0.9), seed=i), grammar=grammar)
            for i in range(n)
        ]
        texts: list[list[str]] = [[] for _ in range(n)]

        async def collect(index: int, generation: Any) -> None:
            async for event in generation.events():
                if isinstance(event, TextDelta):
                    texts[index].append(event.text)

        generations = engine.submit_choices(requests)
        await asyncio.gather(*(collect(i, g) for i, g in enumerate(generations)))
        return ["".join(parts) for parts in texts]

    return asyncio.run(run())


def test_compiled_grammar_gives_each_choice_a_fresh_copy(engine: LlamaEngine) -> None:
    """Choices sampled together from one compiled grammar each follow it from its start
    (a shared state would refuse the second choice's first word), and the compiled grammar
    stays in its start state for a later request."""
    compiled = engine.compile_grammar(GrammarSpec('root ::= ("yes" | "no") " " [a-z]{2,6} "."'))
    assert isinstance(compiled, CompiledGrammar)
    pattern = re.compile(r"(yes|no) [a-z]{2,6}\.")
    for _ in range(2):
        texts = choices(engine, compiled, 3)
        assert all(pattern.fullmatch(text) for text in texts), texts


def test_compiled_grammar_samples_as_a_fresh_compile(engine: LlamaEngine) -> None:
    spec = GrammarSpec('root ::= [A-Za-z ,]{1,40} "."')
    assert generate(engine, engine.compile_grammar(spec), 0) == generate(engine, spec, 0)
    lazy = GrammarSpec('root ::= "{" [a-z]* "}"', trigger_patterns=("(QQQZZ)",))
    assert generate(engine, engine.compile_grammar(lazy)) == generate(engine, None)


def test_compile_refuses_a_grammar_llama_cpp_cannot_parse(engine: LlamaEngine) -> None:
    with pytest.raises(GrammarError):
        engine.compile_grammar(GrammarSpec("root ::= ("))
