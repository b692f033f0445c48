"""The llama.cpp build plan: AMX decision, compiler flags, and the wheel cache key.

This machine's CPU may not report AMX; the AMX branch is then exercised with an ISA list
that contains AMX and with real probes, one of which really dies with SIGILL.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ggufserve.native import wheels
from ggufserve.native.amx import ProbeResult, run_probe
from ggufserve.native.plan import (
    BuildPlanError,
    amx_disable_flags,
    compiler_macros,
    decide_amx,
    make_plan,
    native_isa,
    with_c_flags,
)

AMX_ISA = ["__AMX_BF16__", "__AMX_INT8__", "__AMX_TILE__", "__AVX2__", "__AVX512F__"]
NO_AMX_ISA = ["__AVX2__", "__FMA__"]
WORKS = ProbeResult(True, "amx: tile instructions execute")
FAULTS = ProbeResult(False, "tile instructions fault in a worker thread (SIGILL)")


def never(isa: list[str]) -> bool:
    return False


def plan(cmake_args: str | None = None, *, isa: list[str], probe: ProbeResult = WORKS, **kw):
    return make_plan(
        kw.pop("backend", "cpu"),
        cmake_args,
        kw.pop("amx", "auto"),
        crashed_before=kw.pop("crashed_before", never),
        probe=lambda: probe,
        isa=isa,
    )


def test_amx_disable_flags_name_every_amx_feature_only():
    assert amx_disable_flags(AMX_ISA) == ["-mno-amx-bf16", "-mno-amx-int8", "-mno-amx-tile"]
    assert amx_disable_flags(["__AMX_FP16__", "__AMX_COMPLEX__"]) == [
        "-mno-amx-fp16",
        "-mno-amx-complex",
    ]
    assert amx_disable_flags(NO_AMX_ISA) == []


@pytest.mark.parametrize(
    ("policy", "isa", "probe", "crashed", "expected"),
    [
        ("auto", NO_AMX_ISA, FAULTS, False, "not-in-play"),
        ("on", NO_AMX_ISA, FAULTS, False, "not-in-play"),
        ("auto", AMX_ISA, WORKS, False, "on"),
        ("auto", AMX_ISA, FAULTS, False, "off"),
        ("auto", AMX_ISA, WORKS, True, "off"),
        ("off", AMX_ISA, WORKS, False, "off"),
        ("on", AMX_ISA, WORKS, False, "on"),
    ],
)
def test_decide_amx(policy, isa, probe, crashed, expected):
    decision, reason = decide_amx(policy, isa, lambda: probe, crashed)
    assert decision == expected
    assert reason


@pytest.mark.parametrize(("probe", "crashed"), [(FAULTS, False), (WORKS, True)])
def test_amx_on_refuses_a_build_that_would_crash(probe, crashed):
    with pytest.raises(BuildPlanError, match="AMX=on"):
        decide_amx("on", AMX_ISA, lambda: probe, crashed)


def test_unknown_policy_and_backend_are_refused():
    with pytest.raises(BuildPlanError, match="AMX must be"):
        decide_amx("maybe", AMX_ISA, lambda: WORKS, False)
    with pytest.raises(BuildPlanError, match="BACKEND"):
        plan(isa=NO_AMX_ISA, backend="rocm")


def test_no_amx_in_play_leaves_the_flags_untouched():
    assert plan(isa=NO_AMX_ISA, probe=FAULTS).cmake_args == ""
    assert plan("-DGGML_CUDA=on", isa=NO_AMX_ISA).cmake_args == "-DGGML_CUDA=on"


def test_faulting_amx_adds_no_amx_flags_to_c_and_cxx():
    args = shlex.split(plan(isa=AMX_ISA, probe=FAULTS).cmake_args)
    expected = "-mno-amx-bf16 -mno-amx-int8 -mno-amx-tile"
    assert args == [f"-DCMAKE_C_FLAGS={expected}", f"-DCMAKE_CXX_FLAGS={expected}"]


def test_user_c_flags_are_merged_not_replaced():
    merged = shlex.split(with_c_flags("-DGGML_BLAS=ON '-DCMAKE_C_FLAGS=-O3 -g'", ["-mno-amx-tile"]))
    assert merged == [
        "-DGGML_BLAS=ON",
        "-DCMAKE_C_FLAGS=-O3 -g -mno-amx-tile",
        "-DCMAKE_CXX_FLAGS=-mno-amx-tile",
    ]


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to check the flags")
def test_no_amx_flags_beat_march_whatever_the_order():
    """ggml puts -march=native after CMAKE_C_FLAGS; the explicit -mno-amx-* must still win.
    Checked with -march=sapphirerapids, which enables AMX on any host."""
    flags = amx_disable_flags(AMX_ISA)
    assert "__AMX_TILE__" in compiler_macros("gcc", ["-march=sapphirerapids"])
    after = compiler_macros("gcc", [*flags, "-march=sapphirerapids"])
    before = compiler_macros("gcc", ["-march=sapphirerapids", *flags])
    assert not [m for m in after | before if m.startswith("__AMX")]
    assert "__AVX512F__" in after  # only AMX goes


def test_cache_key_changes_with_flags_isa_and_backend_only():
    base = plan(isa=AMX_ISA)
    assert plan(isa=AMX_ISA).key == base.key  # same build → same wheel, no rebuild
    others = [
        plan(isa=AMX_ISA, probe=FAULTS),  # AMX off → other flags
        plan("-DGGML_BLAS=ON", isa=AMX_ISA),
        plan(isa=[*AMX_ISA, "__AVX512VNNI__"]),  # another CPU
        plan("-DGGML_CUDA=on", isa=AMX_ISA, backend="cuda"),
    ]
    keys = {p.key for p in others}
    assert base.key not in keys and len(keys) == len(others)
    root = Path("/cache")
    assert len({wheels.wheel_dir(p, root) for p in [base, *others]}) == 1 + len(others)


def test_portable_build_key_ignores_the_cpu():
    one = plan("-DGGML_NATIVE=OFF", isa=[])
    assert one.inputs["native_isa"] == "portable"
    assert plan("-DGGML_NATIVE=off", isa=[]).inputs["native_isa"] == "portable"


def test_native_isa_of_this_machine_matches_the_compiler():
    isa = native_isa("cc")
    assert isa == sorted(isa)
    assert all(name.startswith("__") for name in isa)
    has_amx = " amx_tile" in Path("/proc/cpuinfo").read_text()
    assert bool(amx_disable_flags(isa)) == has_amx


def test_real_probe_fails_cleanly_where_tiles_do_not_run():
    result = run_probe()
    if " amx_tile" not in Path("/proc/cpuinfo").read_text():
        assert not result.works
    assert result.detail


def test_a_probe_that_dies_with_sigill_is_a_failure_not_a_crash(tmp_path):
    source = tmp_path / "trap.c"
    source.write_text("int main(void) { __builtin_trap(); }\n")  # ud2 → SIGILL
    result = run_probe(source=source)
    assert not result.works
    assert "SIGILL" in result.detail


def test_a_probe_that_cannot_compile_is_a_failure(tmp_path):
    source = tmp_path / "broken.c"
    source.write_text("this is not C\n")
    assert not run_probe(source=source).works


def test_plan_command_prints_this_machines_plan():
    done = subprocess.run(
        [sys.executable, "-m", "ggufserve.native.build", "plan", "--amx", "off"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert '"key"' in done.stdout and '"amx"' in done.stdout
