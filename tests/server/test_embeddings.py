"""Embeddings on the real bundled Gemma 3 270M: the engine's pooling and batching, and the
service's validation and wire format."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import pytest
from llama_cpp import _internals
from llama_cpp._logger import set_verbose
from pydantic import ValidationError

from ggufserve.engine.embedding import PAD_TOKEN, ROW_TILE, EmbeddingEngine
from ggufserve.errors import ContextLengthExceededError, InvalidRequestError
from ggufserve.generation.embeddings import EmbeddingRequest, EmbeddingResponse, EmbeddingService

N_CTX = 512
N_BATCH = 128  # the longest input; keeps the logits buffer of the 262k vocabulary small
MAX_INPUTS = 8
TEXTS = [
    "The cat sat on the mat.",
    "Quarterly revenue grew by eleven percent.",
    "Photosynthesis turns light into chemical energy.",
    "I would like a cup of green tea, please.",
    "def add(a, b): return a + b",
]


@pytest.fixture(scope="module")
def model(bundled_gguf: Path) -> Iterator[_internals.LlamaModel]:
    set_verbose(False)
    loaded = _internals.LlamaModel(
        path_model=str(bundled_gguf), params=llama_cpp.llama_model_default_params(), verbose=False
    )
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def engine(model: _internals.LlamaModel) -> Iterator[EmbeddingEngine]:
    # One thread: llama.cpp's spinning workers slow ~10x when other jobs hold the cores.
    embedding = EmbeddingEngine(model, n_ctx=N_CTX, n_threads=1, n_batch=N_BATCH)
    yield embedding
    embedding.close()


def tokens(model: _internals.LlamaModel, text: str) -> list[int]:
    return model.tokenize(text.encode(), add_bos=True, special=True)


def token_means(model: _internals.LlamaModel, ids: list[int]) -> np.ndarray:
    """Mean of the per-token embeddings, from a context without pooling (rows padded as the
    engine pads them, so the same matmul kernels run)."""
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = N_CTX, N_BATCH, N_BATCH
    params.embeddings = True
    params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_NONE
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED  # as the engine's
    params.n_threads = params.n_threads_batch = 1
    params.n_seq_max, params.kv_unified = 2, True
    ctx = _internals.LlamaContext(model=model, params=params, verbose=False)
    n_pad = -len(ids) % ROW_TILE
    batch = _internals.LlamaBatch(n_tokens=len(ids) + n_pad, embd=0, n_seq_max=1, verbose=False)
    try:
        batch.add_sequence(ids, 0, logits_all=True)
        if n_pad:
            batch.add_sequence([PAD_TOKEN] * n_pad, 1, logits_all=True)
        ctx.decode(batch)
        n_embd = model.n_embd()
        rows = [
            np.ctypeslib.as_array(ctx.get_embeddings_ith(i), shape=(n_embd,)).copy()
            for i in range(len(ids))
        ]
    finally:
        batch.close()
        ctx.close()
    return np.mean(rows, axis=0)  # (n_embd,)


def create(engine: EmbeddingEngine, model: _internals.LlamaModel, **body: Any) -> Any:
    request = EmbeddingRequest.model_validate({"model": "gemma", **body})
    service = EmbeddingService(max_inputs=MAX_INPUTS)
    return asyncio.run(
        service.create(
            request,
            service.check(request),
            engine=engine,
            tokenize=lambda text: model.tokenize(text.encode(), add_bos=False, special=True),
            add_bos=True,
            bos_token_id=model.token_bos(),
            n_vocab=model.n_vocab(),
            model_id="gemma",
        )
    )


# ---- engine ----------------------------------------------------------------------------


def test_engine_shape_and_pooling(engine: EmbeddingEngine, model: _internals.LlamaModel) -> None:
    assert engine.pooling == "mean"  # Gemma 3 declares no pooling
    assert engine.n_embd == model.n_embd() == 640
    assert engine.max_tokens == N_BATCH
    (vector,) = engine.embed([tokens(model, TEXTS[0])])
    assert vector.dtype == np.float32 and vector.shape == (640,)
    assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5


def test_identical_inputs_match_and_different_ones_differ(
    engine: EmbeddingEngine, model: _internals.LlamaModel
) -> None:
    a, b, c = engine.embed(
        [tokens(model, TEXTS[0]), tokens(model, TEXTS[0]), tokens(model, TEXTS[1])]
    )
    assert abs(float(a @ b) - 1.0) < 1e-6
    assert float(a @ c) < 0.999


def test_batch_equals_one_by_one(engine: EmbeddingEngine, model: _internals.LlamaModel) -> None:
    batch = [tokens(model, text) for text in TEXTS]
    together = engine.embed(batch)
    for ids, vector in zip(batch, together, strict=True):
        (alone,) = engine.embed([ids])
        np.testing.assert_allclose(vector, alone, atol=1e-4)  # bit-equal on AVX2 CPUs


def test_concurrent_calls_are_serialised(
    engine: EmbeddingEngine, model: _internals.LlamaModel
) -> None:
    batches = [[tokens(model, text)] for text in TEXTS[:4]]
    expected = [engine.embed(batch)[0] for batch in batches]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(engine.embed, batches))
    for (vector,), want in zip(results, expected, strict=True):
        np.testing.assert_array_equal(vector, want)


def test_groups_split_by_sequences_and_rows(engine: EmbeddingEngine) -> None:
    # Inputs are padded to whole ROW_TILE blocks; a decode holds n_seq_max inputs at most.
    assert engine.n_seq_max == 7 and ROW_TILE == 16
    sizes = [len(group) for group in engine._groups([[2] * 10] * 9)]
    assert sizes == [7, 2]
    sizes = [len(group) for group in engine._groups([[2] * 60, [2] * 60, [2] * 60, [2] * 5])]
    assert sizes == [2, 2]  # 64 + 64 rows fill n_batch; then 64 + 16
    assert [len(g) for g in engine._groups([[2] * N_BATCH, [2]])] == [1, 1]


def test_inputs_split_over_decodes_embed_alike(
    engine: EmbeddingEngine, model: _internals.LlamaModel
) -> None:
    # 10 inputs: a decode of 7, then one of 3 holding the same texts again.
    vectors = engine.embed([tokens(model, text) for text in TEXTS] * 2)
    assert len(vectors) == 10
    for first, again in zip(vectors[:5], vectors[5:], strict=True):
        np.testing.assert_allclose(first, again, atol=1e-6)


def test_pooled_vector_is_mean_of_token_embeddings(
    engine: EmbeddingEngine, model: _internals.LlamaModel
) -> None:
    ids = tokens(model, TEXTS[2])
    mean = token_means(model, ids)
    (pooled,) = engine.embed([ids])
    np.testing.assert_allclose(pooled, mean / np.linalg.norm(mean), atol=1e-4)


def test_too_long_and_bad_ids_raise(engine: EmbeddingEngine) -> None:
    with pytest.raises(ValueError, match=f"at most {N_BATCH} tokens"):
        engine.embed([[2] * (N_BATCH + 1)])
    with pytest.raises(ValueError, match="empty"):
        engine.embed([[]])
    with pytest.raises(ValueError, match="outside"):
        engine.embed([[2, 262144]])


def test_closed_engine_raises(model: _internals.LlamaModel) -> None:
    embedding = EmbeddingEngine(model, n_ctx=256, n_threads=1, n_batch=32, n_seq_max=2)
    embedding.close()
    embedding.close()
    with pytest.raises(RuntimeError, match="closed"):
        embedding.embed([[2, 3]])


# ---- service ---------------------------------------------------------------------------


def test_response_float_and_base64(engine: EmbeddingEngine, model: _internals.LlamaModel) -> None:
    plain: EmbeddingResponse = create(engine, model, input=TEXTS[:2])
    packed: EmbeddingResponse = create(engine, model, input=TEXTS[:2], encoding_format="base64")
    wire = plain.model_dump(mode="json")
    assert wire["object"] == "list" and wire["model"] == "gemma"
    assert [d["index"] for d in wire["data"]] == [0, 1]
    assert all(d["object"] == "embedding" and len(d["embedding"]) == 640 for d in wire["data"])
    n_tokens = sum(len(tokens(model, text)) for text in TEXTS[:2])
    assert wire["usage"] == {"prompt_tokens": n_tokens, "total_tokens": n_tokens}
    for floats, encoded in zip(plain.data, packed.data, strict=True):
        assert isinstance(encoded.embedding, str)
        decoded = np.frombuffer(base64.b64decode(encoded.embedding), dtype="<f4")
        np.testing.assert_array_equal(decoded, np.array(floats.embedding, dtype=np.float32))


def test_token_ids_equal_text(engine: EmbeddingEngine, model: _internals.LlamaModel) -> None:
    text = TEXTS[3]
    ids = model.tokenize(text.encode(), add_bos=False, special=True)
    by_text = create(engine, model, input=text).data[0].embedding
    by_ids = create(engine, model, input=ids).data[0].embedding  # BOS added alike
    by_ids_bos = create(engine, model, input=[[model.token_bos(), *ids]]).data[0].embedding
    np.testing.assert_allclose(by_text, by_ids, atol=1e-6)
    np.testing.assert_allclose(by_text, by_ids_bos, atol=1e-6)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": [[5, 262144]]}, "input"),
        ({"input": [3, -1]}, "input"),
        ({"input": ["a"] * (MAX_INPUTS + 1)}, "input"),
        ({"input": ["ok", ""]}, "input"),
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": [[]]}, "input"),
        ({"input": "x", "dimensions": 256}, "dimensions"),
    ],
)
def test_service_validation(
    engine: EmbeddingEngine, model: _internals.LlamaModel, body: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        create(engine, model, **body)
    assert caught.value.param == param
    assert caught.value.status_code == 400


def test_service_refuses_too_long_input(
    engine: EmbeddingEngine, model: _internals.LlamaModel
) -> None:
    with pytest.raises(ContextLengthExceededError) as caught:
        create(engine, model, input=[[7] * N_BATCH])  # N_BATCH + BOS
    assert caught.value.param == "input"
    assert caught.value.code == "context_length_exceeded"


def test_dimensions_equal_to_width_is_accepted(
    engine: EmbeddingEngine, model: _internals.LlamaModel
) -> None:
    response = create(engine, model, input="hello", dimensions=640, user="u-1")
    assert len(response.data[0].embedding) == 640


@pytest.mark.parametrize(
    "value",
    [5, [1.5], ["a", 1], [True], [["a"]], None, {"text": "a"}],
)
def test_request_rejects_wrong_input_types(value: object) -> None:
    with pytest.raises(ValidationError) as caught:
        EmbeddingRequest.model_validate({"model": "m", "input": value})
    errors = caught.value.errors()
    assert [tuple(e["loc"]) for e in errors] == [("input",)]


def test_request_rejects_bad_fields() -> None:
    for extra in ({"encoding_format": "int8"}, {"dimensions": 0}, {"dimensions": "640"}):
        with pytest.raises(ValidationError):
            EmbeddingRequest.model_validate({"model": "m", "input": "a", **extra})
    request = EmbeddingRequest.model_validate({"model": "m", "input": "a", "extra_field": 1})
    assert request.encoding_format is None
