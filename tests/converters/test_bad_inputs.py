"""Hostile or broken checkpoints: a named error, exit code 2, no traceback, no output file."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from ggufserve.converters.__main__ import main
from tests.conftest import REPO

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json")


def make_ckpt(
    folder: Path,
    source: Path,
    *,
    config: dict[str, Any] | None = None,
    weights: bytes | None = None,
) -> Path:
    """A checkpoint folder with the tiny model's tokenizer, a config and given weights."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, folder / name)
    base = json.loads((source / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config if config is not None else base))
    if weights is not None:
        (folder / "model.safetensors").write_bytes(weights)
    return folder


def raw_safetensors(header: Any, data: bytes = b"", length: int | None = None) -> bytes:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def run(tmp_path: Path, source: Path, *extra: str) -> tuple[int, str, list[str]]:
    out = tmp_path / "out"
    code = main(["convert", str(source), "--out", str(out), "--name", "m", *extra])
    files = sorted(p.name for p in out.iterdir()) if out.exists() else []
    return code, "", files


def expect_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], folder: Path, error: str, text: str
) -> None:
    code, _, files = run(tmp_path, folder)
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"error: {error}: " in err and text in err, err
    assert "Traceback" not in err
    assert files == []


F32_4x4 = {"model.norm.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}


@pytest.mark.parametrize(
    ("weights", "text"),
    [
        (raw_safetensors(F32_4x4, bytes(64), length=2**60), "invalid safetensors"),
        (raw_safetensors(F32_4x4, bytes(64), length=10_000), "invalid safetensors"),
        (raw_safetensors(b"{not json", bytes(64)), "invalid safetensors"),
        (
            raw_safetensors(
                {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 10**9]}}, bytes(64)
            ),
            "invalid safetensors",
        ),
        (
            raw_safetensors(
                {
                    "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                    "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
                },
                bytes(24),
            ),
            "invalid safetensors",
        ),
        (
            raw_safetensors(
                {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 8]}}, bytes(8)
            ),
            "invalid safetensors",
        ),
        (
            raw_safetensors(
                {"w": {"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 16]}}, bytes(16)
            ),
            "invalid safetensors",
        ),
        (
            raw_safetensors(
                {"w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}, bytes(16)
            ),
            "invalid safetensors",
        ),
        (
            raw_safetensors(
                {"w": {"dtype": "Q9_X", "shape": [4], "data_offsets": [0, 16]}}, bytes(16)
            ),
            "invalid safetensors",
        ),
        (
            raw_safetensors(
                {"w": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}}, bytes(16)
            ),
            "unsupported dtype I64",
        ),
        (b"\x01\x02", "invalid safetensors"),
    ],
    ids=[
        "absurd-header-length",
        "header-past-eof",
        "malformed-json",
        "offsets-out-of-range",
        "overlapping-offsets",
        "bytes-not-shape-x-dtype",
        "negative-shape",
        "enormous-shape",
        "unknown-dtype",
        "integer-dtype",
        "truncated-file",
    ],
)
def test_bad_safetensors(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    gemma3_text_ckpt: Path,
    weights: bytes,
    text: str,
) -> None:
    folder = make_ckpt(tmp_path / "ckpt", gemma3_text_ckpt, weights=weights)
    expect_failure(tmp_path, capsys, folder, "SafetensorsError", text)


def config_with(source: Path, **changes: Any) -> dict[str, Any]:
    config = json.loads((source / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    return config


@pytest.mark.parametrize(
    ("changes", "error", "text"),
    [
        ({"hidden_size": None}, "ConfigError", "missing required key 'hidden_size'"),
        ({"num_hidden_layers": "six"}, "ConfigError", "key 'num_hidden_layers' must be int"),
        ({"num_attention_heads": True}, "ConfigError", "key 'num_attention_heads' must be int"),
        ({"query_pre_attn_scalar": 99}, "ConfigError", "query_pre_attn_scalar"),
        ({"attn_logit_softcapping": 50.0}, "ConfigError", "attn_logit_softcapping"),
        (
            {"architectures": ["LlamaForCausalLM"]},
            "UnsupportedArchitectureError",
            "LlamaForCausalLM",
        ),
        ({"architectures": None}, "UnsupportedArchitectureError", "no 'architectures'"),
        ({"auto_map": {"AutoModel": "evil.Model"}}, "CheckpointError", "remote code"),
    ],
)
def test_bad_config(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    gemma3_text_ckpt: Path,
    changes: dict[str, Any],
    error: str,
    text: str,
) -> None:
    folder = make_ckpt(
        tmp_path / "ckpt", gemma3_text_ckpt, config=config_with(gemma3_text_ckpt, **changes)
    )
    os.symlink(gemma3_text_ckpt / "model.safetensors", folder / "model.safetensors")
    expect_failure(tmp_path, capsys, folder, error, text)


def test_config_not_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], gemma3_text_ckpt: Path
) -> None:
    folder = make_ckpt(tmp_path / "ckpt", gemma3_text_ckpt)
    (folder / "config.json").write_text("{broken")
    expect_failure(tmp_path, capsys, folder, "ConfigError", "config.json is not readable JSON")


@pytest.mark.parametrize(
    ("shard", "text"),
    [
        ("../outside.safetensors", "outside the checkpoint folder"),
        ("/etc/passwd", "outside the checkpoint folder"),
        ("missing.safetensors", "missing shard"),
    ],
)
def test_bad_index(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    gemma3_text_ckpt: Path,
    shard: str,
    text: str,
) -> None:
    folder = make_ckpt(tmp_path / "ckpt", gemma3_text_ckpt)
    save_file({"x": np.zeros(4, np.float32)}, str(tmp_path / "outside.safetensors"))
    index = {"weight_map": {"model.norm.weight": shard}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    expect_failure(tmp_path, capsys, folder, "CheckpointError", text)


def test_index_disagrees_with_shard(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], gemma3_text_ckpt: Path
) -> None:
    folder = make_ckpt(tmp_path / "ckpt", gemma3_text_ckpt)
    save_file({"model.norm.weight": np.zeros(64, np.float32)}, str(folder / "a.safetensors"))
    index = {
        "weight_map": {
            "model.norm.weight": "a.safetensors",
            "model.embed_tokens.weight": "a.safetensors",
        }
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    expect_failure(tmp_path, capsys, folder, "CheckpointError", "which lacks it")


def test_pickle_weights_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], gemma3_text_ckpt: Path
) -> None:
    folder = make_ckpt(tmp_path / "ckpt", gemma3_text_ckpt)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 pickle that would run code")
    expect_failure(tmp_path, capsys, folder, "CheckpointError", "pickle")


@pytest.mark.parametrize(
    ("tensors", "error", "text"),
    [
        (
            {"model.layers.0.mystery.weight": np.zeros(64, np.float32)},
            "TensorMappingError",
            "no GGUF name for tensor 'model.layers.0.mystery.weight'",
        ),
        (
            {"foo.bar": np.zeros(4, np.float32)},
            "TensorMappingError",
            "belong to no converter (first: foo.bar)",
        ),
        (
            {"model.layers.0.self_attn.q_proj.weight": np.zeros((3, 3), np.float32)},
            "TensorMappingError",
            "has shape [3, 3]",
        ),
    ],
)
def test_unmappable_tensors_are_fatal(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    gemma3_text_ckpt: Path,
    tensors: dict[str, np.ndarray],
    error: str,
    text: str,
) -> None:
    folder = make_ckpt(tmp_path / "ckpt", gemma3_text_ckpt)
    save_file(tensors, str(folder / "model.safetensors"))
    expect_failure(tmp_path, capsys, folder, error, text)


def test_missing_tokenizer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], gemma3_text_ckpt: Path
) -> None:
    folder = make_ckpt(tmp_path / "ckpt", gemma3_text_ckpt)
    (folder / "tokenizer.model").unlink()
    os.symlink(gemma3_text_ckpt / "model.safetensors", folder / "model.safetensors")
    expect_failure(tmp_path, capsys, folder, "VocabError", "no tokenizer.model or tokenizer.json")


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_existing_output_is_kept_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], gemma3_text_ckpt: Path, kind: str
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    target = out / "m-F32.gguf"
    if kind == "file":
        target.write_text("keep me")
    else:
        target.symlink_to(victim)
    code = main(["convert", str(gemma3_text_ckpt), "--out", str(out), "--name", "m"])
    err = capsys.readouterr().err
    assert code == 2 and "OutputExistsError" in err and "--force" in err
    assert victim.read_text() == "keep me" and target.read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == ["m-F32.gguf"]


def test_disk_full_leaves_no_partial_file(tmp_path: Path, gemma3_text_ckpt: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()

    def limit_file_size() -> None:  # the child sees "File too large" once past 8 MB
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8 * 2**20, 8 * 2**20))

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ggufserve.converters",
            "convert",
            str(gemma3_text_ckpt),
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        preexec_fn=limit_file_size,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    assert "error: cannot write output" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(out.iterdir()) == []
