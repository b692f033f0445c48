"""KV cache types on the bundled model, in-process: q8_0 / q4_0 caches load, are the size
the memory estimate says (llama.cpp's own report), generate, and stay close to f16; a
quantized V cache without flash attention is refused before anything loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from ggufserve.engine.base import ModelLoadError, TokenLogprob
from ggufserve.engine.kv_cache import KV_CACHE_TYPES, KvCacheType, ggml_type, row_bytes
from ggufserve.engine.llama import LlamaEngine
from ggufserve.models.memory import MiB, kv_bytes_per_token
from tests.bench.copy_heavy import FREE_REQUEST
from tests.bench.kv_types import kl_vs_f16, kv_buffer_mib, load_logged
from tests.server.test_speculation_model import assert_same_greedy, request, run

N_CTX = 1024
TOKENS = 48
ENGINE = {
    "n_ctx": N_CTX,
    "n_parallel": 1,
    "n_gpu_layers": 0,
    "n_threads": 2,
    "n_batch": 512,
    "max_queued": 4,
    "speculation": None,
}


def test_type_ids_match_llama_cpp() -> None:
    import llama_cpp

    for name in KV_CACHE_TYPES:
        constant = getattr(llama_cpp, f"GGML_TYPE_{name.upper()}", None)
        assert constant is None or ggml_type(name) == constant  # bf16 has no constant there
    assert (row_bytes("f16", 256), row_bytes("q8_0", 256), row_bytes("q4_0", 256)) == (
        512,
        272,
        144,
    )
    with pytest.raises(KeyError):
        ggml_type("q4_k")


def generate(
    path: Path, kinds: tuple[KvCacheType, KvCacheType], flash_attn: str = "auto"
) -> tuple[list[TokenLogprob], float]:
    """Greedy tokens (with their top-2 logprobs) for a fixed request, and llama.cpp's
    reported KV buffer size in MiB."""
    engine, lines = load_logged(
        path, **ENGINE, cache_type_k=kinds[0], cache_type_v=kinds[1], flash_attn=flash_attn
    )
    try:
        (tokens,) = run(engine, [request(engine, FREE_REQUEST, TOKENS)])
    finally:
        engine.close()
    return tokens, kv_buffer_mib(lines)


@pytest.fixture(scope="module")
def f16_output(bundled_gguf: Path) -> list[TokenLogprob]:
    tokens, _ = generate(bundled_gguf, ("f16", "f16"))
    return tokens


@pytest.mark.parametrize(
    ("kinds", "flash_attn"),
    [(("q8_0", "q8_0"), "auto"), (("q4_0", "q4_0"), "on"), (("q8_0", "f16"), "off")],
)
def test_quantized_cache_loads_and_generates(
    bundled_gguf: Path,
    f16_output: list[TokenLogprob],
    kinds: tuple[KvCacheType, KvCacheType],
    flash_attn: str,
) -> None:
    tokens, kv_mib = generate(bundled_gguf, kinds, flash_attn)
    assert tokens and b"".join(t.piece for t in tokens).strip()
    # llama.cpp's buffers are the estimate's size (to its 2-decimal MiB log)
    estimate = N_CTX * kv_bytes_per_token(bundled_gguf, *kinds) / MiB
    assert kv_mib == pytest.approx(estimate, abs=0.02 * 3)
    if kinds == ("q8_0", "q8_0"):
        # Greedy q8_0 follows f16 token for token, parting (if at all) only where f16's
        # two best tokens are near-tied: exact equality would fail on any near-tie, while
        # this still fails if quantization moved a confident argmax.
        assert assert_same_greedy(f16_output, tokens) >= 8


def test_quantized_v_without_flash_attention_is_refused(bundled_gguf: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"cache_type_v q4_0 .*flash_attn"):
        LlamaEngine(bundled_gguf, **ENGINE, cache_type_v="q4_0", flash_attn="off")  # type: ignore[arg-type]


def test_kl_to_f16_is_small_and_grows_with_coarser_types(bundled_gguf: Path) -> None:
    """Over 256 positions of the calibration text: q8_0 is nearly f16, q4_0 further off
    (docs/engine-and-performance.md#kv-cache-types has the full-text figures)."""
    q8 = kl_vs_f16(bundled_gguf, ("q8_0", "q8_0"), 2, 256)
    q4 = kl_vs_f16(bundled_gguf, ("q4_0", "q4_0"), 2, 256)
    assert 0 < q8.kl_mean < q4.kl_mean
    assert q8.kl_mean < 0.05 and q8.top1 > 0.9  # measured 0.02 / 0.95 over the whole text
    assert q4.top1 > 0.7
