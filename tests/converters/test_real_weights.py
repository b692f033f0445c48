"""Real weights: the bundled Gemma 3 270M, dequantized to an HF checkpoint, converted back
by us, equals transformers; its quantizations stay close (KL divergence vs F32)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ggufserve.converters.quantize import quantize
from tests.converters.parity import compare, llama_logits, reference_logits

MiB = 2**20
# Tensors stream through in 32 MiB chunks: peak RSS is Python + numpy + gguf-py + a few
# chunks (361 MiB measured for both a 1 GiB and a 2 GiB checkpoint), whatever the size.
FIXED_MARGIN_MB = 512
# real_ckpt (the bundled 270M dequantized to an HF checkpoint) and real_f32 (our F32
# conversion of it, with the converter's peak RSS) are session fixtures in conftest.py.


# A fixed English + Markdown + code text (the README's opening as of this test's figures):
# the measured agreement must not move when the documentation is edited.
QUALITY_TEXT = Path(__file__).with_name("data") / "quality_text.md"


def text_ids(tokenizer: Any, n_tokens: int) -> list[int]:
    text = QUALITY_TEXT.read_text(encoding="utf-8")
    ids = tokenizer(text)["input_ids"][:n_tokens]
    assert len(ids) == n_tokens
    return ids


def test_conversion_memory_is_a_fixed_margin(real_ckpt: Path, real_f32: dict[str, Any]) -> None:
    from ggufserve.converters.checkpoint import Checkpoint

    ckpt = Checkpoint.open(real_ckpt)
    total = sum(ref.nbytes for ref in ckpt.tensors.values())
    largest = max(ref.nbytes for ref in ckpt.tensors.values())  # F32: bytes == float32 bytes
    peak = real_f32["peak_rss"]
    print(
        f"\nreal 270M F32 checkpoint {total / MiB:.0f} MiB, "
        f"largest tensor {largest / MiB:.0f} MiB, "
        f"conversion peak RSS {peak / MiB:.0f} MiB"
    )
    assert peak <= FIXED_MARGIN_MB * MiB
    assert peak < largest  # not even the largest tensor is held whole


def test_round_trip_logits_equal_transformers(real_ckpt: Path, real_f32: dict[str, Any]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real_ckpt)
    model = AutoModelForCausalLM.from_pretrained(real_ckpt, dtype=torch.float32).eval()
    ids = text_ids(tokenizer, 256)
    reference = reference_logits(model, ids)
    parity = compare(reference, llama_logits(str(real_f32["path"]), ids))
    print(
        f"\nreal 270M F32 round trip: max|dlogit| {parity.max_abs:.4f} over range "
        f"{parity.logit_range:.1f} ({parity.relative:.2e}), top-1 {parity.top1_agree:.4f}"
    )
    assert parity.relative <= 1e-3, parity
    assert parity.top1_agree >= 0.99, parity


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


@pytest.mark.parametrize(
    ("quant", "max_kl", "min_top1"), [("Q8_0", 0.01, 0.95), ("Q4_K_M", 0.1, 0.85)]
)
def test_quantized_real_model_stays_close(
    real_ckpt: Path, real_f32: dict[str, Any], quant: str, max_kl: float, min_top1: float
) -> None:
    from transformers import AutoTokenizer

    target = quantize(real_f32["path"], real_f32["out"] / f"real-{quant}.gguf", quant, force=True)
    ids = text_ids(AutoTokenizer.from_pretrained(real_ckpt), 300)
    base = log_softmax(llama_logits(str(real_f32["path"]), ids, f32_kv=False))
    got = log_softmax(llama_logits(str(target), ids, f32_kv=False))
    kl = (np.exp(base) * (base - got)).sum(-1)
    top1 = float((base.argmax(-1) == got.argmax(-1)).mean())
    size_mb = target.stat().st_size / 1e6
    print(
        f"\n{quant}: {size_mb:.1f} MB (F32 {real_f32['path'].stat().st_size / 1e6:.1f} MB), "
        f"KL mean {kl.mean():.5f} max {kl.max():.4f}, "
        f"top-1 agreement {top1:.4f} over {len(ids)} tokens"
    )
    assert kl.mean() <= max_kl
    assert top1 >= min_top1
