"""The model store through the real CLI: pull from a local checkpoint folder, from an
offline Hugging Face cache (safetensors and GGUF repos), ls, rm (refused while a server
holds the model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ggufserve.store.model_store import ModelStore
from tests.conftest import REPO, fake_hub_cache


def cli(
    home: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m ggufserve ARGS`` with the store at ``home``."""
    return subprocess.run(
        [sys.executable, "-m", "ggufserve", *args],
        cwd=REPO,
        env={**os.environ, "GGUFSERVE_HOME": str(home), **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


def record_of(home: Path, model_id: str) -> dict[str, object]:
    record = ModelStore(home).find(model_id)
    assert record is not None, f"{model_id} not in the store"
    return record.model_dump()


def test_pull_local_checkpoint_then_found_not_converted(
    gemma3_text_ckpt: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "tiny-gemma"
    folder.symlink_to(gemma3_text_ckpt)
    started = time.monotonic()
    first = cli(tmp_path / "home", "pull", str(folder), "--quant", "Q8_0")
    first_s = time.monotonic() - started
    assert first.returncode == 0, first.stderr
    assert "pulled tiny-gemma:Q8_0" in first.stdout
    record = record_of(tmp_path / "home", "tiny-gemma:Q8_0")
    gguf = Path(str(record["gguf"]))
    # Only the served file (and its quality report) stay: the F32 intermediate is gone.
    assert gguf.parent.parent == tmp_path / "home" / "models"
    assert sorted(p.name for p in gguf.parent.glob("*.gguf")) == [gguf.name]
    assert record["architecture"] == "gemma3" and record["quant"] == "Q8_0"
    # The quantization's measured quality shows in ls (from the file's metadata).
    (row,) = cli(tmp_path / "home", "ls").stdout.splitlines()[1:]
    assert row.split()[:4] == ["tiny-gemma:Q8_0", "gemma3", "17M", "Q8_0"]
    assert " KL 0.0" in row and "top1 " in row
    started = time.monotonic()
    second = cli(tmp_path / "home", "pull", str(folder), "--quant", "Q8_0")
    second_s = time.monotonic() - started
    assert second.returncode == 0, second.stderr
    assert "already in the store: tiny-gemma:Q8_0" in second.stdout
    assert record_of(tmp_path / "home", "tiny-gemma:Q8_0")["created"] == record["created"]
    assert second_s < first_s, (first_s, second_s)


def test_pull_from_offline_hub_cache_safetensors_and_gguf(
    gemma3_text_ckpt: Path, bundled_gguf: Path, tmp_path: Path
) -> None:
    hub = tmp_path / "hub"
    files = {p.name: p for p in gemma3_text_ckpt.iterdir() if not p.name.startswith(".")}
    snapshot = fake_hub_cache(hub, "example-org/tiny-gemma-3", files)
    fake_hub_cache(hub, "example-org/gemma-3-270m-GGUF", {"gemma-3-270m-Q4_K_M.gguf": bundled_gguf})
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub)}
    home = tmp_path / "home"
    converted = cli(home, "pull", "example-org/tiny-gemma-3", "--quant", "F16", env=env)
    assert converted.returncode == 0, converted.stderr
    record = record_of(home, "tiny-gemma-3:F16")
    assert record["source"] == "example-org/tiny-gemma-3"
    assert record["revision"] == snapshot.name
    downloaded = cli(home, "pull", "example-org/gemma-3-270m-GGUF", env=env)
    assert downloaded.returncode == 0, downloaded.stderr
    record = record_of(home, "gemma-3-270m-GGUF:Q4_K_M")
    # A downloaded GGUF stays in huggingface_hub's cache; the store only records it.
    assert str(record["gguf"]).startswith(str(hub))
    assert record["n_params"] == 268_098_176
    missing_quant = cli(home, "pull", "example-org/gemma-3-270m-GGUF", "--quant", "Q2_K", env=env)
    assert missing_quant.returncode == 1
    assert "has no Q2_K GGUF" in missing_quant.stderr and "Traceback" not in missing_quant.stderr
    missing = cli(home, "pull", "example-org/not-cached", env=env)
    assert missing.returncode == 1
    assert "not in the Hugging Face cache" in missing.stderr
    listing = cli(home, "ls")
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].split() == [
        "ID",
        "ARCH",
        "PARAMS",
        "QUANT",
        "SIZE",
        "MMPROJ",
        "QUALITY",
        "SOURCE",
    ]
    by_id = {line.split()[0]: line for line in lines[1:]}
    assert set(by_id) == {"gemma-3-270m-GGUF:Q4_K_M", "tiny-gemma-3:F16"}
    assert "268M" in by_id["gemma-3-270m-GGUF:Q4_K_M"]
    assert "253.1 MB" in by_id["gemma-3-270m-GGUF:Q4_K_M"]
    assert f"example-org/tiny-gemma-3@{snapshot.name[:12]}" in by_id["tiny-gemma-3:F16"]


def test_rm_refused_while_held_then_removed(bundled_gguf: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    pulled = cli(home, "pull", str(bundled_gguf))
    assert pulled.returncode == 0, pulled.stderr
    store = ModelStore(home)
    (record,) = store.records()
    release = store.hold(record.id)
    try:
        refused = cli(home, "rm", record.id)
        assert refused.returncode == 1
        assert "loaded by a running server" in refused.stderr
        assert store.find(record.id) is not None
    finally:
        release()
    removed = cli(home, "rm", record.id)
    assert removed.returncode == 0, removed.stderr
    assert store.records() == []
    # A registered local GGUF is only referenced: removing the entry keeps the file.
    assert bundled_gguf.is_file()
    unknown = cli(home, "rm", "no-such-model")
    assert unknown.returncode == 1 and "no model 'no-such-model'" in unknown.stderr
    empty = cli(home, "ls")
    assert "the store is empty" in empty.stdout


def test_pull_of_an_unknown_source_is_one_line(tmp_path: Path) -> None:
    result = cli(tmp_path / "home", "pull", "not a thing")
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "not a GGUF file" in result.stderr


def test_interrupted_conversion_leaves_no_entry(gemma3_text_ckpt: Path, tmp_path: Path) -> None:
    """A conversion that fails midway (here: Ctrl-C) leaves neither files nor a record."""
    from ggufserve.store.pull import pull

    store = ModelStore(tmp_path / "home")

    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkey = pytest.MonkeyPatch()
    monkey.setattr("ggufserve.converters.convert.quantize_and_report", interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            pull(store, str(gemma3_text_ckpt), "Q8_0", report=False)
    finally:
        monkey.undo()
    assert store.records() == []
    assert list(store.root.iterdir()) == []


def test_record_json_is_readable(bundled_gguf: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert cli(home, "pull", str(bundled_gguf)).returncode == 0
    (path,) = (home / "models").glob("*/record.json")
    document = json.loads(path.read_text())
    assert document["source"] == str(bundled_gguf.resolve())
    assert document["quant"] == "GGUF"
