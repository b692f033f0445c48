"""Qwen3-VL (dense and MoE) converted by us, run by llama.cpp, equals transformers (float32
reference): text logits, the text rows after an image (M-RoPE positions, deepstack),
vision embeddings with deepstack features, and tokenization."""

from __future__ import annotations

from typing import Any

import llama_cpp
import numpy as np
import pytest
import torch
from llama_cpp import mtmd_cpp

from ggufserve.converters.convert import ConversionResult
from tests.converters.conftest import QWEN_VARIANTS
from tests.converters.mtmd_embed import chat_with_image, image_embeddings, logits_after_image
from tests.converters.parity import compare, llama_logits, reference_logits
from tests.converters.qwen_builders import IMAGE_PAD_ID
from tests.converters.test_gemma3_parity import PROMPTS
from tests.converters.test_tokenizer_parity import corpus

CHAT_PROMPT = "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n<think>\n"
# Sides are multiples of patch_size × spatial_merge_size (32) within both resize limits, so
# neither side resizes (CONVERTER_NOTES.md); square and non-square, 8 to 64 image tokens.
IMAGE_SIZES = [(128, 128), (64, 128), (160, 96), (256, 256)]


def _image(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("variant", QWEN_VARIANTS)
@pytest.mark.parametrize("prompt", [*PROMPTS, CHAT_PROMPT], ids=[*"ABCD", "chat"])
def test_text_logits_f32(
    hf_qwen: dict[str, Any],
    qwen_converted: dict[str, ConversionResult],
    variant: str,
    prompt: str,
) -> None:
    model, tokenizer, _ = hf_qwen[variant]
    ids = tokenizer(prompt)["input_ids"]
    reference = reference_logits(model, ids)
    parity = compare(reference, llama_logits(str(qwen_converted[f"{variant}-f32"].text), ids))
    print(f"\n{variant} F32 {len(ids)} tokens: {parity} relative {parity.relative:.2e}")
    assert parity.relative <= 1e-3, parity
    assert parity.top1_agree == 1.0, parity


@pytest.mark.parametrize("variant", QWEN_VARIANTS)
def test_text_logits_f16_top1(
    hf_qwen: dict[str, Any], qwen_converted: dict[str, ConversionResult], variant: str
) -> None:
    model, tokenizer, _ = hf_qwen[variant]
    agree, positions = 0.0, 0
    for prompt in [*PROMPTS, CHAT_PROMPT]:
        ids = tokenizer(prompt)["input_ids"]
        reference = reference_logits(model, ids)
        parity = compare(reference, llama_logits(str(qwen_converted[f"{variant}-f16"].text), ids))
        agree += parity.top1_agree * parity.positions
        positions += parity.positions
    print(f"\n{variant} F16 top-1 agreement {agree / positions:.4f} over {positions} positions")
    assert positions > 100
    assert agree / positions >= 0.99


@pytest.mark.parametrize("variant", QWEN_VARIANTS)
@pytest.mark.parametrize("size", IMAGE_SIZES[:3], ids=lambda s: f"{s[0]}x{s[1]}")
def test_text_rows_after_an_image_f32(
    hf_qwen: dict[str, Any],
    qwen_converted: dict[str, ConversionResult],
    variant: str,
    size: tuple[int, int],
) -> None:
    """llama.cpp's mtmd places the image (M-RoPE t/h/w positions, deepstack rows) and the
    text after it advances by max(grid h, grid w); transformers gets the same token ids,
    with <|image_pad|> at the image rows and its own ``get_rope_index`` positions."""
    model, _, processor = hf_qwen[variant]
    result = qwen_converted[f"{variant}-f32"]
    assert result.mmproj is not None
    image = _image(*size, seed=size[0] + size[1])
    marker = mtmd_cpp.mtmd_default_marker().decode()
    prompt = (
        f"<|im_start|>user\nLook: {marker} What is this picture about? Describe it."
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    llama = llama_cpp.Llama(
        str(result.text), n_ctx=512, logits_all=True, verbose=False, type_k=0, type_v=0
    )
    try:
        ran = logits_after_image(llama, result.mmproj, prompt, image)
    finally:
        llama.close()
    pixels = processor(images=[image], return_tensors="pt")
    grid = pixels["image_grid_thw"][0].tolist()
    assert [ran.ny, ran.nx] == [grid[1] // 2, grid[2] // 2]
    assert ran.n_image_tokens == grid[1] * grid[2] // 4
    ids = ran.before + [IMAGE_PAD_ID] * ran.n_image_tokens + ran.after
    kinds = [0] * len(ran.before) + [1] * ran.n_image_tokens + [0] * len(ran.after)
    with torch.no_grad():
        reference = model(
            input_ids=torch.tensor([ids]),
            pixel_values=pixels["pixel_values"],
            image_grid_thw=pixels["image_grid_thw"],
            mm_token_type_ids=torch.tensor([kinds]),
        ).logits[0, -len(ran.after) :]
    parity = compare(reference.numpy(), ran.logits_after)
    print(f"\n{variant} {size} after image: {parity} relative {parity.relative:.2e}")
    assert parity.relative <= 1e-3, parity
    assert parity.top1_agree == 1.0, parity


@pytest.mark.parametrize("variant", QWEN_VARIANTS)
def test_vision_embeddings_with_deepstack_match_transformers(
    hf_qwen: dict[str, Any], qwen_converted: dict[str, ConversionResult], variant: str
) -> None:
    model, _, processor = hf_qwen[variant]
    result = qwen_converted[f"{variant}-f32"]
    assert result.mmproj is not None
    images = [_image(*size, seed=i) for i, size in enumerate(IMAGE_SIZES)]
    llama = llama_cpp.Llama(str(result.text), n_ctx=256, verbose=False)
    try:
        embeddings = image_embeddings(llama, result.mmproj, images)
    finally:
        llama.close()
    n_embd = model.config.text_config.hidden_size
    n_deepstack = len(model.config.vision_config.deepstack_visual_indexes)
    for image, got in zip(images, embeddings, strict=True):
        pixels = processor(images=[image], return_tensors="pt")
        with torch.no_grad():
            out = model.model.visual(pixels["pixel_values"], grid_thw=pixels["image_grid_thw"])
        # mtmd's row: [main merger | deepstack merger of each deepstack block, in order].
        reference = torch.cat([out.pooler_output, *out.deepstack_features], dim=-1).numpy()
        height, width, _ = image.shape
        assert got.shape == reference.shape == (height * width // 32**2, n_embd * (1 + n_deepstack))
        cosine = (reference * got).sum(-1) / np.linalg.norm(reference, axis=-1)
        cosine /= np.linalg.norm(got, axis=-1)
        print(
            f"\n{variant} {height}x{width}: cosine min {cosine.min():.7f}, "
            f"max|d| {np.abs(reference - got).max():.2e}"
        )
        assert cosine.min() >= 0.999, cosine
    assert not np.allclose(embeddings[0], embeddings[3][: len(embeddings[0])], atol=1e-3)


QWEN_STRINGS = [
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n",
    "<think>\nreasoning\n</think>\n\nanswer",
    '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>',
    "<|vision_start|><|image_pad|><|vision_end|>What is this?",
    "text<|endoftext|>more",
    "1234567890 digits split one by one: 3.14159",
]


@pytest.mark.parametrize("variant", QWEN_VARIANTS)
def test_tokenizer_parity(
    hf_qwen: dict[str, Any], qwen_converted: dict[str, ConversionResult], variant: str
) -> None:
    _, tokenizer, _ = hf_qwen[variant]
    llama = llama_cpp.Llama(
        str(qwen_converted[f"{variant}-f32"].text), vocab_only=True, verbose=False
    )
    strings = corpus() + QWEN_STRINGS
    mismatches = []
    for text in strings:
        expected = tokenizer(text)["input_ids"]
        got = llama.tokenize(text.encode(), add_bos=False, special=True)
        if got != expected:
            mismatches.append((text, expected[:12], got[:12]))
    print(f"\n{variant}: {len(strings) - len(mismatches)}/{len(strings)} strings identical")
    assert len(strings) >= 500
    assert not mismatches, f"{len(mismatches)}/{len(strings)} differ, e.g. {mismatches[:3]}"


@pytest.mark.parametrize("variant", QWEN_VARIANTS)
def test_image_chat_through_llama_cpp_python_multimodal_path(
    qwen_converted: dict[str, ConversionResult], variant: str
) -> None:
    result = qwen_converted[f"{variant}-f32"]
    assert result.mmproj is not None
    usage = chat_with_image(result.text, result.mmproj, (128, 96))["usage"]
    # 128×96 → 4×3 merged patches = 12 image tokens, which advance 4 positions (M-RoPE);
    # llama-cpp-python counts positions (CONVERTER_NOTES.md).
    assert usage["prompt_tokens"] > 4
    assert usage["completion_tokens"] >= 1
