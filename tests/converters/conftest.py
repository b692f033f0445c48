"""Session fixtures: tiny Gemma 3 and Qwen3-VL checkpoints (cached on disk), their
conversions, and the transformers reference models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from converters.convert import ConversionResult, convert

QWEN_VARIANTS = ["dense", "moe"]


@pytest.fixture(scope="session")
def converted(
    tmp_path_factory: pytest.TempPathFactory, gemma3_text_ckpt: Path, gemma3_mm_ckpt: Path
) -> dict[str, ConversionResult]:
    """Our converter's outputs: text model at f32 and f16; multimodal at f32 (+ f32 mmproj)."""
    out = tmp_path_factory.mktemp("converted")
    return {
        "text-f32": convert(str(gemma3_text_ckpt), out_dir=out, name="text", outtype="f32"),
        "text-f16": convert(str(gemma3_text_ckpt), out_dir=out, name="text", outtype="f16"),
        "mm-f32": convert(
            str(gemma3_mm_ckpt), out_dir=out, name="mm", outtype="f32", mmproj_type="f32"
        ),
    }


@pytest.fixture(scope="session")
def hf_text(gemma3_text_ckpt: Path) -> tuple[Any, Any]:
    """(transformers model in float32, tokenizer) for the text checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gemma3_text_ckpt, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(gemma3_text_ckpt)


@pytest.fixture(scope="session")
def hf_mm(gemma3_mm_ckpt: Path) -> Any:
    import torch
    from transformers import Gemma3ForConditionalGeneration

    return Gemma3ForConditionalGeneration.from_pretrained(
        gemma3_mm_ckpt, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="session")
def qwen_converted(
    tmp_path_factory: pytest.TempPathFactory, qwen_ckpt: dict[str, Path]
) -> dict[str, ConversionResult]:
    """``<variant>-f32`` (text + f32 mmproj) and ``<variant>-f16`` conversions."""
    out = tmp_path_factory.mktemp("qwen-converted")
    results = {}
    for variant, ckpt in qwen_ckpt.items():
        for outtype in ("f32", "f16"):
            results[f"{variant}-{outtype}"] = convert(
                str(ckpt), out_dir=out, name=variant, outtype=outtype, mmproj_type=outtype
            )
    return results


@pytest.fixture(scope="session")
def hf_qwen(qwen_ckpt: dict[str, Path]) -> dict[str, tuple[Any, Any, Any]]:
    """variant → (transformers model in float32, tokenizer, image processor)."""
    import torch
    import transformers

    classes = {
        "dense": transformers.Qwen3VLForConditionalGeneration,
        "moe": transformers.Qwen3VLMoeForConditionalGeneration,
    }
    return {
        variant: (
            classes[variant].from_pretrained(ckpt, dtype=torch.float32).eval(),
            transformers.AutoTokenizer.from_pretrained(ckpt),
            transformers.AutoImageProcessor.from_pretrained(ckpt),
        )
        for variant, ckpt in qwen_ckpt.items()
    }
