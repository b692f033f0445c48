"""A wheel cache for llama-cpp-python keyed by the whole build (:class:`BuildPlan.key`).

pip's own wheel cache keys a wheel built from an sdist by the sdist alone, not by
``CMAKE_ARGS`` or the machine, so it silently reuses a build made with other flags (or a
``-march=native`` build from another CPU). Here each key has its own folder; a build with
the same key is reused (a second ``make install`` costs seconds), any other key builds.

Layout under :func:`cache_root`::

    sdist/llama_cpp_python-<version>.tar.gz   downloaded once (through pip's HTTP cache)
    <key>/llama_cpp_python-*.whl + plan.json  one build
    amx-crashed/<isa digest>                  llama.cpp's AMX path crashed on such a CPU

Standard library only (runs before the project is installed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ggufserve.native.plan import LLAMA_CPP_PYTHON_VERSION, BuildPlan, make_plan

RECORD_NAME = "ggufserve-llama-build.json"


class WheelBuildError(Exception):
    """pip could not download the sdist, build the wheel, or install it."""


def cache_root() -> Path:
    """``GGUFSERVE_WHEEL_CACHE``, else ``$XDG_CACHE_HOME/ggufserve/llama-cpp-python``
    (``~/.cache`` when XDG_CACHE_HOME is unset)."""
    explicit = os.environ.get("GGUFSERVE_WHEEL_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ggufserve" / "llama-cpp-python"


def wheel_dir(plan: BuildPlan, root: Path) -> Path:
    return root / plan.key


def cached_wheel(plan: BuildPlan, root: Path) -> Path | None:
    """The wheel built for ``plan.key``, if there is one."""
    wheels = sorted(wheel_dir(plan, root).glob("llama_cpp_python-*.whl"))
    return wheels[0] if wheels else None


def _isa_marker(isa: list[str], root: Path) -> Path:
    digest = hashlib.sha256("\n".join(isa).encode()).hexdigest()[:16]
    return root / "amx-crashed" / digest


def amx_crashed_before(isa: list[str], root: Path) -> bool:
    return _isa_marker(isa, root).exists()


def record_amx_crash(isa: list[str], root: Path) -> None:
    """Remember that llama.cpp's AMX path crashed on a CPU with this instruction set."""
    marker = _isa_marker(isa, root)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("\n".join(isa) + "\n")


def machine_plan(backend: str, amx_policy: str) -> BuildPlan:
    """The build this machine gets now: ``CMAKE_ARGS`` from the environment (None → the
    backend's default) and AMX crashes remembered under :func:`cache_root`.

    Raises:
        BuildPlanError: see :func:`ggufserve.native.plan.make_plan`.
    """
    root = cache_root()
    return make_plan(
        backend,
        os.environ.get("CMAKE_ARGS"),
        amx_policy,
        crashed_before=lambda isa: amx_crashed_before(isa, root),
    )


def _pip(python: str, args: list[str], env: dict[str, str] | None = None) -> None:
    done = subprocess.run([python, "-m", "pip", *args], env=env, check=False)
    if done.returncode != 0:
        raise WheelBuildError(f"pip {args[0]} failed (exit {done.returncode})")


def sdist(python: str, root: Path) -> Path:
    folder = root / "sdist"
    found = sorted(folder.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    _pip(
        python,
        ["download", "--no-deps", "--no-binary", ":all:", "-d", str(folder),
         f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"],
    )  # fmt: skip
    found = sorted(folder.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"))
    if not found:
        raise WheelBuildError("pip download gave no llama-cpp-python sdist")
    return found[0]


def build_wheel(plan: BuildPlan, python: str, root: Path) -> Path:
    """Build llama-cpp-python with ``plan.cmake_args`` into ``<root>/<key>/`` (atomically:
    an interrupted build leaves no wheel behind) and return the wheel.

    Raises:
        WheelBuildError: the download or the build failed.
    """
    sdist_path = sdist(python, root)
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CMAKE_ARGS": plan.cmake_args, "FORCE_CMAKE": "1"}
    with tempfile.TemporaryDirectory(prefix=f".{plan.key}-", dir=root) as staging:
        # --no-cache-dir: pip's wheel cache must neither serve nor keep this build.
        _pip(python, ["wheel", "--no-deps", "--no-cache-dir", "-w", staging, str(sdist_path)], env)
        (Path(staging) / "plan.json").write_text(plan.to_json())
        target = wheel_dir(plan, root)
        shutil.rmtree(target, ignore_errors=True)
        os.chmod(staging, 0o755)  # mkdtemp made it private; the cache may be shared
        os.replace(staging, target)
        os.mkdir(staging)  # TemporaryDirectory removes it on exit
    wheel = cached_wheel(plan, root)
    if wheel is None:
        raise WheelBuildError("pip wheel produced no llama-cpp-python wheel")
    return wheel


def installed_record(venv: Path) -> dict[str, object] | None:
    """The build installed in ``venv`` by :func:`install`, or None."""
    try:
        return json.loads((venv / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return None


def install(plan: BuildPlan, wheel: Path, python: str, venv: Path) -> None:
    """Install ``wheel`` into ``venv`` (replacing any other build) and record ``plan``.

    Raises:
        WheelBuildError: pip failed.
    """
    _pip(python, ["install", "--no-deps", "--force-reinstall", "--no-cache-dir", str(wheel)])
    record = {**json.loads(plan.to_json()), "wheel": str(wheel)}
    (venv / RECORD_NAME).write_text(json.dumps(record, indent=2, sort_keys=True))
