"""Session fixtures: tiny Gemma 3 checkpoints (cached on disk) and their conversions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from converters.convert import ConversionResult, convert


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
