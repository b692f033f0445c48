"""``ggufserve doctor`` and the smoke generation behind it and behind ``serve``'s start-up
check, on the real installed llama.cpp; a crashing library is a child that really dies
from SIGILL."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ggufserve.cli import main as cli
from ggufserve.native.smoke import REBUILD_HINT, SmokeResult, run_smoke
from ggufserve.native.sysinfo import parse_system_info, system_info
from ggufserve.native.wheels import installed_record, machine_plan

REPO = Path(__file__).resolve().parents[2]


def fake_python(tmp_path: Path, body: str) -> str:
    """An executable standing in for the child interpreter (the library's crash, simulated
    by the process really being killed by the signal)."""
    script = tmp_path / "python"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def test_parse_system_info_splits_backends_and_features():
    text = "CPU : SSE3 = 1 | AVX2 = 1 | AMX_INT8 = 1 | CUDA : ARCHS = 890 | USE_GRAPHS = 1 | "
    assert parse_system_info(text) == {
        "CPU": {"SSE3": "1", "AVX2": "1", "AMX_INT8": "1"},
        "CUDA": {"ARCHS": "890", "USE_GRAPHS": "1"},
    }


def test_system_info_reports_the_cpu_backend_and_its_compiled_features():
    info = system_info()
    cpu = info.backends["CPU"]
    cpuinfo = Path("/proc/cpuinfo").read_text()
    # A native build compiles in what this CPU has.
    if " avx2" in cpuinfo:
        assert cpu.get("AVX2") == "1"
    assert info.amx_compiled == any(cpu.get(k) == "1" for k in ("AMX_INT8", "AMX_BF16"))
    assert any("(cpu)" in device for device in info.devices)
    assert info.summary().startswith(f"llama-cpp-python {info.version}: CPU [")


def test_smoke_generation_runs_in_a_child(bundled_gguf):
    result = run_smoke(bundled_gguf, 0)
    assert result.ok, result.summary
    assert result.summary.startswith("generated 8 tokens")


def test_a_child_killed_by_sigill_is_one_line_with_the_fix(tmp_path, bundled_gguf):
    result = run_smoke(bundled_gguf, 0, python=fake_python(tmp_path, "kill -ILL $$"))
    assert result == SmokeResult(False, "SIGILL", result.summary, result.seconds)
    assert "Illegal instruction" in result.summary and REBUILD_HINT in result.summary
    assert "\n" not in result.summary


def test_a_child_that_fails_says_how(tmp_path, bundled_gguf):
    result = run_smoke(bundled_gguf, 0, python=fake_python(tmp_path, "echo boom >&2; exit 7"))
    assert not result.ok and result.signal_name is None
    assert "exit 7: boom" in result.summary


def doctor(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ggufserve", "doctor", *args],
        capture_output=True, text=True, cwd=cwd, check=False, timeout=600,
    )  # fmt: skip


@pytest.mark.model  # the smoke generation loads the repository's models.yaml model
def test_doctor_prints_the_build_and_a_passing_generation():
    done = doctor()
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("llama.cpp  : llama-cpp-python 0.3.36: CPU [")
    assert any(line.startswith("device     : CPU (cpu): ") for line in lines)
    assert any(line.startswith("AMX        : compiled in: ") for line in lines)
    assert any(line.startswith("build      : ") for line in lines)
    assert any(
        line.startswith("smoke      : gemma-3-270m (n_gpu_layers -1): ok: generated 8 tokens")
        for line in lines
    ), done.stdout


def test_doctor_reports_a_model_it_cannot_run(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    models = tmp_path / "models.yaml"
    models.write_text(yaml.safe_dump({"models": [{"id": "bad", "gguf": {"path": str(bad)}}]}))
    done = doctor("--models", str(models))
    assert done.returncode == 1
    assert (
        "smoke      : bad (n_gpu_layers -1): FAIL: llama.cpp failed a tiny generation"
        in done.stdout
    )
    assert "Traceback" not in done.stdout


def test_serve_refuses_to_start_on_a_crashing_library(monkeypatch, capsys):
    failed = SmokeResult(False, "SIGILL", f"llama.cpp crashed (SIGILL); fix: {REBUILD_HINT}", 0.1)
    monkeypatch.setattr("ggufserve.native.startup_check.check_library", lambda: failed)
    code = cli.main(["serve", "--models", str(REPO / "models.yaml"), "--port", "0"])
    assert code == cli.EXIT_BROKEN_BUILD
    assert capsys.readouterr().err.strip() == f"ggufserve: error: {failed.summary}"


def test_a_second_install_with_the_same_flags_does_not_rebuild():
    record = installed_record(Path(sys.prefix))
    if record is None:
        pytest.skip("llama-cpp-python in this venv was not installed by `make install`")
    plan = machine_plan("cpu", "auto")
    if plan.key != record["key"]:
        pytest.skip("this venv was installed with other flags than the default (AMX, CMAKE_ARGS)")
    done = subprocess.run(
        [sys.executable, "-m", "ggufserve.native.build", "ensure"],
        capture_output=True, text=True, cwd=REPO, check=True, timeout=120,
    )  # fmt: skip
    assert "this build is already installed" in done.stdout, done.stdout
