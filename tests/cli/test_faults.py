"""Faults during ``pull`` / ``convert`` / ``quantize``, through the real CLI in subprocesses:
``kill -9`` at several points leaves no store entry and no file under a final name, the
quantizer child dies with its parent, and the rerun completes and sweeps what the killed
run left; a full disk (a size-limited tmpfs) is a one-line named error, nothing kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ggufserve.store.model_store import ModelStore, slug
from tests.cli.test_store import cli
from tests.conftest import REPO

NAME = "tiny-gemma"
STORE_ID = f"{NAME}:Q8_0"
KILL_WAIT_S = 300  # the phase to kill in must start within this
TEMP_SUFFIXES = (".partial", ".scratch")


def start_cli(home: Path, *args: str) -> subprocess.Popen[str]:
    """``python -m ggufserve ARGS`` started in the background, the store at ``home``."""
    return subprocess.Popen(
        [sys.executable, "-m", "ggufserve", *args],
        cwd=REPO,
        env={**os.environ, "GGUFSERVE_HOME": str(home)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_during(process: subprocess.Popen[str], phase: Callable[[int], bool]) -> list[int]:
    """SIGKILL ``process`` as soon as ``phase(pid)`` is true; return the children it had."""
    deadline = time.monotonic() + KILL_WAIT_S
    while not phase(process.pid):
        if process.poll() is not None:
            output, _ = process.communicate()
            pytest.fail(f"finished before the phase to kill in ({process.returncode}):\n{output}")
        assert time.monotonic() < deadline, "the phase to kill in never started"
        time.sleep(0.005)
    kids = children(process.pid)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)  # also closes the pipe
    assert process.returncode == -signal.SIGKILL
    return kids


def assert_gone(pids: list[int], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids), f"left running: {pids}"


def partial_bytes(folder: Path, pattern: str) -> int:
    """Size of the largest temporary matching ``pattern``: a quantizer that outlived its
    killed parent would have written its whole output there."""
    return max(p.stat().st_size for p in folder.glob(pattern))


def temporaries(folder: Path) -> list[str]:
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.endswith(TEMP_SUFFIXES)
    )


def writing(folder: Path, pattern: str, *, child: bool = False) -> Callable[[int], bool]:
    """True once ``folder`` holds a file matching ``pattern`` (and, with ``child``, the
    process has a child: the quantizer)."""
    return lambda pid: any(folder.glob(pattern)) and (not child or bool(children(pid)))


def assert_no_entry(home: Path) -> None:
    store = ModelStore(home)
    assert store.records() == []
    assert [p.name for p in store.root.iterdir() if not p.name.startswith(".")] == []
    assert "the store is empty" in cli(home, "ls").stdout


@pytest.mark.parametrize(
    ("phase", "pattern"),
    [
        ("conversion", f".staging-*/.{NAME}-F32.gguf.*.partial"),
        ("quantization", f".staging-*/.{NAME}-Q8_0.gguf.*.partial"),
    ],
)
def test_pull_killed_leaves_no_entry_and_rerun_completes(
    gemma3_text_ckpt: Path, tmp_path: Path, phase: str, pattern: str
) -> None:
    folder = tmp_path / NAME
    folder.symlink_to(gemma3_text_ckpt)
    home = tmp_path / "home"
    args = ("pull", str(folder), "--quant", "Q8_0", "--no-report")
    quantizing = phase == "quantization"
    kids = kill_during(start_cli(home, *args), writing(home / "models", pattern, child=quantizing))
    assert_gone(kids)
    left_bytes = partial_bytes(home / "models", pattern)
    assert_no_entry(home)
    assert list((home / "models").glob(".staging-*")), "the killed run's staging is left"

    rerun = cli(home, *args)
    assert rerun.returncode == 0, rerun.stderr
    assert f"pulled {STORE_ID}" in rerun.stdout
    store = ModelStore(home)
    (record,) = store.records()
    assert record.id == STORE_ID and Path(record.gguf).is_file()
    if quantizing:  # the quantizer child died with its parent: it did not write on
        assert left_bytes < Path(record.gguf).stat().st_size
    # The killed run's staging folder is swept; the entry holds no temporaries.
    assert [p.name for p in store.root.iterdir()] == [slug(STORE_ID)]
    assert temporaries(store.root) == []


def test_convert_and_quantize_killed_leave_no_file_under_a_final_name(
    gemma3_text_ckpt: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    text, quantized = out / f"{NAME}-F32.gguf", out / f"{NAME}-Q8_0.gguf"
    convert = ("convert", str(gemma3_text_ckpt), "--name", NAME, "--out", str(out))
    convert += ("--quant", "Q8_0", "--no-report")
    home = tmp_path / "home"

    # Killed while the text GGUF is written: no file under its name, only a temporary.
    kill_during(start_cli(home, *convert), writing(out, f".{text.name}.*.partial"))
    assert not text.exists() and not quantized.exists()
    assert temporaries(out) != []
    rerun = cli(home, *convert)
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted([quantized.name, text.name])

    # Killed while llama.cpp quantizes: the text GGUF stays whole, no quantized file; the
    # quantizer child dies too; `quantize` then completes and sweeps the temporary.
    quantized.unlink()
    started = start_cli(home, "quantize", str(text), "Q8_0", "--no-report")
    kids = kill_during(started, writing(out, f".{quantized.name}.*.partial", child=True))
    assert_gone(kids)
    left_bytes = partial_bytes(out, f".{quantized.name}.*.partial")
    assert not quantized.exists() and temporaries(out) != []
    again = cli(home, "quantize", str(text), "Q8_0", "--no-report")
    assert again.returncode == 0, again.stderr
    assert left_bytes < quantized.stat().st_size
    assert sorted(p.name for p in out.iterdir()) == sorted([quantized.name, text.name])
    assert cli(home, "pull", str(quantized)).returncode == 0  # llama.cpp reads it


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """Mount size-limited tmpfs folders (KiB); skipped where mounting is not permitted."""
    mounted: list[Path] = []

    def mount(size_kib: int) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        command = ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(folder)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=30)
        except OSError as exc:
            pytest.skip(f"cannot mount a tmpfs: {exc}")
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {result.stderr.strip() or result.returncode}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False, timeout=30)


def assert_one_line_error(result: subprocess.CompletedProcess[str], words: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and words in errors[0], result.stderr


def test_full_disk_during_convert_and_quantize(
    gemma3_text_ckpt: Path, tmp_path: Path, small_disk: Callable[[int], Path]
) -> None:
    # 8 MiB: the F32 text GGUF (~70 MB) and the Q8_0 file (~18 MB) cannot fit.
    disk = small_disk(8 * 1024)
    home = tmp_path / "home"
    result = cli(home, "convert", str(gemma3_text_ckpt), "--name", NAME, "--out", str(disk))
    assert_one_line_error(result, "No space left on device")
    assert list(disk.iterdir()) == []

    text = tmp_path / f"{NAME}-F32.gguf"
    made = cli(home, "convert", str(gemma3_text_ckpt), "--name", NAME, "--out", str(tmp_path))
    assert made.returncode == 0, made.stderr
    quantize = ("quantize", str(text), "Q8_0", "--no-report", "--out", str(disk / "q.gguf"))
    assert_one_line_error(cli(home, *quantize), "No space left on device")
    assert list(disk.iterdir()) == []


def test_full_disk_during_pull(
    gemma3_text_ckpt: Path, tmp_path: Path, small_disk: Callable[[int], Path]
) -> None:
    home = small_disk(8 * 1024)
    result = cli(home, "pull", str(gemma3_text_ckpt), "--quant", "Q8_0", "--no-report")
    assert_one_line_error(result, "no space left on the store's disk")
    assert_no_entry(home)
    assert list((home / "models").iterdir()) == []
