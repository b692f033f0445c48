"""``python -m ggufserve.native.build verify``: a build whose smoke generation dies with
SIGILL while AMX is compiled in is remembered for this CPU and rebuilt without AMX.

The child is a stand-in interpreter that really dies from SIGILL on its first smoke run;
the rebuild itself (minutes) is replaced by a recorder of what ``ensure`` was asked."""

from __future__ import annotations

import argparse
import json
import stat
from pathlib import Path

from ggufserve.native import build
from ggufserve.native.wheels import RECORD_NAME, amx_crashed_before

AMX_ISA = ["__AMX_INT8__", "__AMX_TILE__", "__AVX512F__"]


def stand_in_python(tmp_path: Path, crashes: int) -> str:
    """Prints a model path for ``-c``; for the smoke child, dies by SIGILL ``crashes``
    times, then reports a generation."""
    counter = tmp_path / "smoke-runs"
    script = tmp_path / "python"
    script.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "-c" ]; then echo /models/tiny.gguf; exit 0; fi\n'
        f'echo run >> "{counter}"\n'
        f'if [ "$(wc -l < "{counter}")" -le {crashes} ]; then kill -ILL $$; fi\n'
        'echo \'{"tokens": 8, "seconds": 0.5}\'\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def venv_with(tmp_path: Path, amx: str) -> Path:
    venv = tmp_path / "venv"
    venv.mkdir()
    record = {"key": "k-amx", "amx": amx, "inputs": {"native_isa": AMX_ISA}}
    (venv / RECORD_NAME).write_text(json.dumps(record))
    return venv


def test_sigill_with_amx_on_rebuilds_without_amx(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("GGUFSERVE_WHEEL_CACHE", str(cache))
    venv = venv_with(tmp_path, "on")
    asked: list[str] = []

    def rebuilt(args: argparse.Namespace) -> int:
        asked.append(args.amx)
        record = {"key": "k-no-amx", "amx": "off", "inputs": {"native_isa": AMX_ISA}}
        (venv / RECORD_NAME).write_text(json.dumps(record))
        return 0

    monkeypatch.setattr(build, "ensure", rebuilt)
    python = stand_in_python(tmp_path, crashes=1)
    assert build.main(["verify", "--venv", str(venv), "--python", python]) == 0
    assert asked == ["auto"]
    assert amx_crashed_before(AMX_ISA, cache)  # the next plan for this CPU leaves AMX off
    assert (venv / build.VERIFIED_NAME).read_text() == "k-no-amx"


def test_sigill_without_amx_fails_with_the_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GGUFSERVE_WHEEL_CACHE", str(tmp_path / "cache"))
    venv = venv_with(tmp_path, "not-in-play")

    def no_rebuild(args: argparse.Namespace) -> int:
        raise AssertionError("a build without AMX is not rebuilt")

    monkeypatch.setattr(build, "ensure", no_rebuild)
    python = stand_in_python(tmp_path, crashes=1)
    assert build.main(["verify", "--venv", str(venv), "--python", python]) == 1
    out = capsys.readouterr().out
    assert "SIGILL" in out and "make install FORCE_REBUILD=1 AMX=off" in out
    assert not (venv / build.VERIFIED_NAME).exists()


def test_a_verified_build_is_not_checked_again(tmp_path, monkeypatch):
    venv = venv_with(tmp_path, "on")
    (venv / build.VERIFIED_NAME).write_text("k-amx")
    python = stand_in_python(tmp_path, crashes=99)  # would crash if run
    assert build.main(["verify", "--venv", str(venv), "--python", python]) == 0
    assert not (tmp_path / "smoke-runs").exists()
