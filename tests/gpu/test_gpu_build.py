"""The build on the GPU machine: ``ggufserve doctor`` names the CUDA device and build, and
llama.cpp offloads every layer of the 1B-shaped model."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO
from tests.gpu.conftest import BACKEND
from tests.gpu.models import SPEED

pytestmark = pytest.mark.gpu
OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
# A child that loads the model with llama.cpp's log on (stderr) and generates one token.
LOAD_CHILD = (
    "import sys, llama_cpp; m = llama_cpp.Llama(sys.argv[1], n_ctx=256, n_gpu_layers=-1); "
    "next(m.generate(m.tokenize(b'Hello'), temp=0.0))"
)


def models_yaml(gpu_models: dict[str, dict[str, Any]], folder: Path) -> Path:
    entry = {"id": SPEED, "gguf": {"path": gpu_models[SPEED]["gguf"]}, "n_ctx": 2048}
    path = folder / "models.yaml"
    path.write_text(yaml.safe_dump({"models": [entry]}))
    return path


def test_doctor_names_the_device_and_the_build(
    gpu_models: dict[str, dict[str, Any]], tmp_path: Path, figures: dict[str, Any]
) -> None:
    command = [sys.executable, "-m", "ggufserve", "doctor", "--models"]
    command += [str(models_yaml(gpu_models, tmp_path)), "--model", SPEED]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = done.stdout.splitlines()
    figures.update(returncode=done.returncode, doctor=lines, stderr=done.stderr[-2000:])
    assert done.returncode == 0, done.stdout + done.stderr
    assert any(line.startswith(f"smoke      : {SPEED} (n_gpu_layers -1): ok") for line in lines)
    summary = next(line for line in lines if line.startswith("llama.cpp  :"))
    if BACKEND == "cuda":
        assert "GPU offload yes" in summary
        assert any(re.match(r"device     : CUDA0 \(gpu\): ", line) for line in lines), lines
        assert any(line.startswith("build      : backend cuda") for line in lines), lines
    else:
        assert "GPU offload no" in summary
        assert not any("(gpu)" in line for line in lines)


def test_every_layer_is_offloaded(
    gpu_models: dict[str, dict[str, Any]], figures: dict[str, Any]
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", LOAD_CHILD, gpu_models[SPEED]["gguf"]],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    found = OFFLOADED.search(done.stderr)
    figures.update(
        returncode=done.returncode,
        offloaded=[int(found[1]), int(found[2])] if found else None,
        log=[line for line in done.stderr.splitlines() if "offload" in line or "CUDA" in line],
    )
    assert done.returncode == 0, done.stderr[-2000:]
    if BACKEND == "cuda":
        assert found, done.stderr[-2000:]
        assert found[1] == found[2], found[0]
    else:
        assert not found or found[1] == "0", found
