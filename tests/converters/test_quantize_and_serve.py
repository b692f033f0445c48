"""Quantization through llama.cpp, --register, and serving the converted model."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import llama_cpp
import pytest

from ggufserve.converters.__main__ import main
from ggufserve.converters.convert import ConversionResult
from ggufserve.converters.quantize import QUANT_TYPES
from tests.conftest import REPO, RunningServer, fake_hub_cache

REQUIRED_TYPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q4_0", "IQ4_NL"]


def test_required_types_are_offered() -> None:
    assert set(REQUIRED_TYPES) <= set(QUANT_TYPES)


@pytest.mark.parametrize("quant", REQUIRED_TYPES)
def test_each_type_loads_and_generates(
    converted: dict[str, ConversionResult], tmp_path: Path, quant: str
) -> None:
    target = tmp_path / f"text-{quant}.gguf"
    # The quality report has its own tests (test_quality.py): skipped here, 8 times ~10 s.
    command = ["quantize", str(converted["text-f32"].text), quant, "--out", str(target)]
    assert main([*command, "--no-report"]) == 0
    llama = llama_cpp.Llama(str(target), n_ctx=128, verbose=False)
    assert int(llama.metadata["general.file_type"]) == getattr(llama_cpp, QUANT_TYPES[quant])
    try:
        tokens = llama.generate(llama.tokenize(b"Hello", add_bos=True), temp=0.0)
        generated = [token for _, token in zip(range(4), tokens, strict=False)]
    finally:
        llama.close()
    assert len(generated) == 4 and all(0 <= t < llama.n_vocab() for t in generated)


def test_unknown_quant_type_is_a_named_error(
    converted: dict[str, ConversionResult], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(["quantize", str(converted["text-f32"].text), "Q7_Z"])
    assert "invalid choice: 'Q7_Z'" in capsys.readouterr().err


def test_convert_quantize_register_then_serve(
    gemma3_text_ckpt: Path,
    gemma3_mm_ckpt: Path,
    tmp_path: Path,
    server_factory: Callable[..., RunningServer],
) -> None:
    models = tmp_path / "models.yaml"
    models.write_text(
        "# my models\nmodels:\n  - id: other\n    gguf: {path: other.gguf}  # keep me\n"
    )
    out = tmp_path / "out"
    for source, name in ((gemma3_text_ckpt, "tiny-text"), (gemma3_mm_ckpt, "tiny-mm")):
        code = main(
            [
                "convert",
                str(source),
                "--out",
                str(out),
                "--name",
                name,
                "--quant",
                "Q4_K_M",
                "--quant",
                "Q8_0",
                "--register",
                "--models",
                str(models),
            ]
        )
        assert code == 0
    text = models.read_text()
    assert "# my models" in text and "# keep me" in text  # comments survive
    assert (
        "gguf: {path: out/tiny-text-Q4_K_M.gguf}" in text
        or "path: out/tiny-text-Q4_K_M.gguf" in text
    )
    assert "mmproj-tiny-mm-F16.gguf" in text
    assert sorted(p.name for p in out.iterdir()) == [
        "mmproj-tiny-mm-F16.gguf",
        "tiny-mm-F32.gguf",
        "tiny-mm-Q4_K_M.gguf",
        "tiny-mm-Q4_K_M.gguf.quality.json",
        "tiny-mm-Q8_0.gguf",
        "tiny-mm-Q8_0.gguf.quality.json",
        "tiny-text-F32.gguf",
        "tiny-text-Q4_K_M.gguf",
        "tiny-text-Q4_K_M.gguf.quality.json",
        "tiny-text-Q8_0.gguf",
        "tiny-text-Q8_0.gguf.quality.json",
    ]
    # Registering again updates the entry instead of adding a second one.
    assert (
        main(
            [
                "convert",
                str(gemma3_text_ckpt),
                "--out",
                str(out),
                "--name",
                "tiny-text",
                "--force",
                "--register",
                "--models",
                str(models),
            ]
        )
        == 0
    )
    assert models.read_text().count("id: tiny-text") == 1
    running = server_factory(
        [{"id": "tiny-text"}, {"id": "tiny-mm"}], models_file=models, api_key=None
    )
    for model in ("tiny-text", "tiny-mm"):
        response = httpx.post(
            f"{running.v1}/chat/completions",
            json={
                "model": model,
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 3,
                "logit_bias": {"1": -100, "106": -100},
            },
            timeout=60,
        )
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 3


def test_convert_from_hub_repo_id_offline(gemma3_text_ckpt: Path, tmp_path: Path) -> None:
    """A repo id resolves through huggingface_hub's cache with HF_HUB_OFFLINE=1."""
    files = {p.name: p for p in gemma3_text_ckpt.iterdir() if not p.name.startswith(".")}
    fake_hub_cache(tmp_path / "hub", "example-org/tiny-gemma-3", files)
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    command = [
        sys.executable,
        "-m",
        "ggufserve.converters",
        "convert",
        "example-org/tiny-gemma-3",
        "--out",
        str(out),
    ]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert [p.name for p in out.iterdir()] == ["tiny-gemma-3-F32.gguf"]
    llama = llama_cpp.Llama(str(out / "tiny-gemma-3-F32.gguf"), vocab_only=True, verbose=False)
    assert (
        llama.metadata["general.source.repo_url"]
        == "https://huggingface.co/example-org/tiny-gemma-3"
    )
    missing = subprocess.run(
        [*command[:4], "example-org/not-cached", "--out", str(out)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2
    assert "not in the Hugging Face cache" in missing.stderr and "Traceback" not in missing.stderr
