"""Gemma 3 converted by us, run by llama.cpp, equals transformers (float32 reference)."""

from __future__ import annotations

from typing import Any

import llama_cpp
import numpy as np
import pytest
import torch

from ggufserve.converters.convert import ConversionResult
from tests.converters.mtmd_embed import chat_with_image, image_embeddings
from tests.converters.parity import compare, llama_logits, reference_logits

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "东京は日本の首都です。 Emoji: 🙂🚀 and    four spaces.",
    # Longer than the 16-token sliding window: local and global layers both matter.
    " ".join(["Once upon a time, in a land far away, there lived a curious cat."] * 5),
]


@pytest.mark.parametrize("prompt", PROMPTS, ids=["english", "code", "cjk-emoji", "long"])
def test_text_logits_f32(
    hf_text: tuple[Any, Any], converted: dict[str, ConversionResult], prompt: str
) -> None:
    model, tokenizer = hf_text
    ids = tokenizer(prompt)["input_ids"]
    parity = compare(
        reference_logits(model, ids), llama_logits(str(converted["text-f32"].text), ids)
    )
    print(f"\nF32 {len(ids)} tokens: {parity}")
    assert parity.relative <= 1e-3, parity
    assert parity.top1_agree == 1.0, parity


def test_text_logits_f16_top1(
    hf_text: tuple[Any, Any], converted: dict[str, ConversionResult]
) -> None:
    model, tokenizer = hf_text
    agree, positions = 0.0, 0
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        parity = compare(
            reference_logits(model, ids), llama_logits(str(converted["text-f16"].text), ids)
        )
        agree += parity.top1_agree * parity.positions
        positions += parity.positions
    print(f"\nF16 top-1 agreement {agree / positions:.4f} over {positions} clear positions")
    assert positions > 100
    assert agree / positions >= 0.99


def test_multimodal_language_model_logits_f32(
    hf_mm: Any, hf_text: tuple[Any, Any], converted: dict[str, ConversionResult]
) -> None:
    _, tokenizer = hf_text
    for prompt in PROMPTS[:2] + PROMPTS[3:]:
        ids = tokenizer(prompt)["input_ids"]
        reference = reference_logits(hf_mm, ids)
        got = llama_logits(str(converted["mm-f32"].text), ids)
        # All 262,208 rows are kept (padding included), as llama.cpp's converter keeps them.
        assert got.shape == reference.shape
        parity = compare(reference, got)
        print(f"\nmultimodal text F32: {parity}")
        assert parity.relative <= 1e-3, parity
        assert parity.top1_agree == 1.0, parity


def test_vision_embeddings_match_transformers(
    hf_mm: Any, converted: dict[str, ConversionResult]
) -> None:
    size = hf_mm.config.vision_config.image_size
    rng = np.random.default_rng(7)
    images = [
        rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        np.full((size, size, 3), (200, 30, 90), dtype=np.uint8),
        np.tile(np.linspace(0, 255, size, dtype=np.uint8)[None, :, None], (size, 1, 3)),
    ]
    result = converted["mm-f32"]
    assert result.mmproj is not None
    llama = llama_cpp.Llama(str(result.text), n_ctx=256, verbose=False)
    try:
        embeddings = image_embeddings(llama, result.mmproj, images)
    finally:
        llama.close()
    for image, got in zip(images, embeddings, strict=True):
        pixels = torch.tensor((image.astype(np.float32) / 255 - 0.5) / 0.5).permute(2, 0, 1)[None]
        with torch.no_grad():
            reference = hf_mm.get_image_features(pixels).pooler_output[0].numpy()
        assert got.shape == reference.shape == (16, hf_mm.config.text_config.hidden_size)
        cosine = (
            (reference * got).sum(-1)
            / np.linalg.norm(reference, axis=-1)
            / np.linalg.norm(got, axis=-1)
        )
        print(f"\nimage: cosine min {cosine.min():.7f}, max|d| {np.abs(reference - got).max():.2e}")
        assert cosine.min() >= 0.999, cosine
    # Different images give different embeddings (the projector is not degenerate).
    assert not np.allclose(embeddings[0], embeddings[1], atol=1e-3)


def test_image_chat_through_llama_cpp_python_multimodal_path(
    converted: dict[str, ConversionResult],
) -> None:
    result = converted["mm-f32"]
    assert result.mmproj is not None
    usage = chat_with_image(result.text, result.mmproj, (112, 112))["usage"]
    # 16 image tokens plus the text around them went through the model.
    assert usage["prompt_tokens"] > 16
    assert usage["completion_tokens"] >= 1
