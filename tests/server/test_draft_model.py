"""Draft-model speculation on a real pair, in-process: the bundled Gemma 3 270M Q4_K_M
drafts for a Q8_0 of the same weights. Greedy output is the same with and without it
(plain, ``n`` = 2, a JSON-schema grammar), drafts are made and kept, sampled output keeps
its distribution, a cancelled stream frees its sequence, and a draft model with another
vocabulary is refused at load."""

from __future__ import annotations

import asyncio
import mmap
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import pytest

from ggufserve.engine.base import ModelLoadError, TextDelta
from ggufserve.engine.llama import LlamaEngine
from ggufserve.engine.speculative import SpecConfig
from ggufserve.models.memory import estimate_bytes, file_bytes, kv_bytes_per_token
from ggufserve.models.model_files import resolve_draft
from ggufserve.settings import ModelsFileError, parse_models_file
from tests.bench.copy_heavy import COPY_REQUEST
from tests.server.test_speculation_model import (
    assert_same_greedy,
    json_schema_greedy_counts,
    pairs,
    request,
    run,
    spec_counts,
    tv_permutation_p,
    two_choices,
)


def draft_engine(target: Path, draft: Path) -> LlamaEngine:
    return LlamaEngine(
        target,
        n_ctx=4096,
        n_parallel=4,
        n_gpu_layers=0,
        n_threads=2,
        n_batch=512,
        max_queued=512,
        speculation=SpecConfig(draft=draft),
    )


@pytest.fixture(scope="module")
def engine(q8_0_gguf: Path, bundled_gguf: Path) -> Iterator[LlamaEngine]:
    engine = draft_engine(q8_0_gguf, bundled_gguf)
    yield engine
    engine.close()


def test_greedy_output_is_the_same_and_the_draft_model_drafts(engine: LlamaEngine) -> None:
    before = spec_counts(engine)
    (off,) = run(engine, [request(engine, COPY_REQUEST, 64, speculative=False)])
    assert spec_counts(engine) == before  # the request turned it off
    (on,) = run(engine, [request(engine, COPY_REQUEST, 64)])
    assert assert_same_greedy(off, on) > 48
    drafted, accepted = (now - then for now, then in zip(spec_counts(engine), before, strict=True))
    # Same weights at another precision: most greedy tokens are drafted and kept.
    assert 0.5 * 64 < accepted <= drafted


def test_greedy_choices_of_one_request_are_the_same(engine: LlamaEngine) -> None:
    off = two_choices(engine, 24, False)
    before = spec_counts(engine)[1]
    on = two_choices(engine, 24, True)
    assert spec_counts(engine)[1] - before > 16  # both choices were drafted for
    for a, b in zip(off, on, strict=True):
        assert assert_same_greedy(a, b) > 16


def test_greedy_output_under_a_json_schema_grammar_is_the_same(engine: LlamaEngine) -> None:
    drafted, accepted = json_schema_greedy_counts(engine, 64)
    assert 0 < accepted <= drafted


def test_sampled_output_keeps_its_distribution(engine: LlamaEngine) -> None:
    """Temperature 2 over the top 3 tokens: the draft model's greedy drafts are checked
    by the sequence's own sampler, so the sampled pairs are distributed alike."""
    samples = 100
    before = spec_counts(engine)[0]
    off = pairs(engine, False, range(samples))
    on = pairs(engine, True, range(samples, 2 * samples))
    assert spec_counts(engine)[0] - before > samples / 2  # drafts were made and checked
    assert min(len(off), len(on)) > 0.9 * samples
    assert len(set(off)) > 1
    assert tv_permutation_p(off, on, rounds=2000) > 1e-3


def test_a_cancelled_stream_frees_its_sequence(engine: LlamaEngine) -> None:
    (alone,) = run(engine, [request(engine, COPY_REQUEST, 24, speculative=False)])

    async def cancel_after_a_few_tokens() -> int:
        generation = engine.submit(request(engine, COPY_REQUEST, 400))
        seen = 0
        async for event in generation.events():
            if isinstance(event, TextDelta):
                seen += len(event.logprobs)
                if seen >= 8:
                    generation.cancel()
                    break
        return seen

    cancelled = engine.stats.requests_cancelled
    assert asyncio.run(cancel_after_a_few_tokens()) >= 8
    (after,) = run(engine, [request(engine, COPY_REQUEST, 24)])
    assert assert_same_greedy(alone, after) > 16
    assert engine.stats.requests_cancelled == cancelled + 1  # dropped, not run to its end


def test_a_draft_model_with_another_vocabulary_is_refused(
    engine: LlamaEngine, q8_0_gguf: Path, bundled_gguf: Path, tmp_path: Path
) -> None:
    (token,) = engine.tokenize(" lighthouse")
    text = llama_cpp.llama_vocab_get_text(
        llama_cpp.llama_model_get_vocab(engine.model.model), token
    )
    other = tmp_path / "other-vocab.gguf"
    shutil.copyfile(bundled_gguf, other)
    with other.open("r+b") as file, mmap.mmap(file.fileno(), 0) as data:
        # GGUF strings are a little-endian u64 length, then the bytes: respell one letter.
        at = data.find(struct.pack("<Q", len(text)) + text) + 8 + len(text) - 1
        assert at > 8 and data.find(struct.pack("<Q", len(text)) + text, at) == -1
        data[at] = ord("X")
    with pytest.raises(ModelLoadError) as info:
        draft_engine(q8_0_gguf, other)
    message = str(info.value)
    assert "other-vocab.gguf" in message and q8_0_gguf.name in message
    assert f"token id {token}" in message
    assert str(tmp_path) not in message  # file names, not folders


def test_the_memory_estimate_counts_the_draft_file_and_its_kv(
    q8_0_gguf: Path, bundled_gguf: Path
) -> None:
    alone = estimate_bytes(q8_0_gguf, None, n_ctx=2048)
    with_draft = estimate_bytes(q8_0_gguf, None, n_ctx=2048, draft=bundled_gguf)
    draft_kv = kv_bytes_per_token(bundled_gguf)
    assert draft_kv > 0
    assert with_draft - alone == file_bytes(bundled_gguf) + 2048 * draft_kv


@pytest.mark.parametrize(
    ("speculative", "expected"),
    [
        ({"type": "draft"}, "type 'draft' needs 'draft'"),
        ({"type": "ngram", "draft": "d.gguf"}, "'draft' applies to type 'draft' only"),
        ({"type": "draft", "draft": ""}, "speculative.draft"),
    ],
)
def test_models_yaml_draft_key_is_checked(speculative: dict[str, str], expected: str) -> None:
    raw = {"models": [{"id": "m", "gguf": {"path": "m.gguf"}, "speculative": speculative}]}
    with pytest.raises(ModelsFileError) as info:
        parse_models_file(raw, "models.yaml")
    assert expected in str(info.value)


def test_draft_resolves_a_path_next_to_models_yaml_else_names_the_miss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "d.gguf").write_bytes(b"GGUF")
    assert resolve_draft("d.gguf", tmp_path) == tmp_path / "d.gguf"
    monkeypatch.setenv("GGUFSERVE_HOME", str(tmp_path / "home"))  # an empty store
    with pytest.raises(ModelsFileError, match="neither a GGUF file nor a model in the store"):
        resolve_draft("google/gemma-3-270m:Q4_K_M", tmp_path)
    entry = parse_models_file(
        {
            "models": [
                {
                    "id": "m",
                    "gguf": {"path": "m.gguf"},
                    "speculative": {"type": "draft", "draft": "d.gguf", "n_max": 8},
                }
            ]
        },
        "models.yaml",
    ).entry("m")
    assert (entry.speculative.type, entry.speculative.draft) == ("draft", "d.gguf")
