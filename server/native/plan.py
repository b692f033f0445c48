"""Decide how llama-cpp-python's llama.cpp is compiled on this machine, and the cache key
of the wheel that build makes.

A CPU build is ``-march=native`` (ggml's default, ``GGML_NATIVE=ON``): the fastest code
for this CPU. On a CPU that reports Intel AMX, native also compiles ggml's AMX matmul
path, which faults (SIGILL) on some CPUs and VMs that report AMX (llama.cpp issues
#13678, #28328, #28756). Policy (``AMX=auto``): keep AMX only when a tile probe executes
in a worker thread and llama.cpp's AMX path has not crashed here before; otherwise add
``-mno-amx-*`` for every AMX feature native would enable. ``AMX=off`` always removes
it; ``AMX=on`` keeps it but refuses to build when the probe fails. Where native enables
no AMX, the flags are left exactly as they were.

Standard library only (runs before the project is installed).
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ggufserve.native.amx import ProbeResult, run_probe

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
BACKEND_CMAKE_ARGS = {"cpu": "", "cuda": "-DGGML_CUDA=on", "metal": "-DGGML_METAL=on"}
AMX_POLICIES = ("auto", "on", "off")
# Predefined macros that name an instruction-set extension (GCC and Clang spellings).
_ISA_MACRO = re.compile(r"#define (__[A-Z0-9_]+__) 1$")
_AMX_MACRO = re.compile(r"^__AMX_([A-Z0-9_]+)__$")
_PORTABLE = re.compile(r"-DGGML_NATIVE(:BOOL)?=(OFF|0|FALSE|NO)\b", re.IGNORECASE)


class BuildPlanError(Exception):
    """The requested build cannot be made safely here (e.g. ``AMX=on`` where AMX faults)."""


@dataclass(frozen=True)
class BuildPlan:
    """Everything that decides the compiled library, and the key derived from it.

    Attributes:
        backend: ``cpu``, ``cuda`` or ``metal``.
        cmake_args: The final ``CMAKE_ARGS`` handed to llama-cpp-python's build.
        amx: ``not-in-play`` (native enables no AMX), ``on`` or ``off``.
        amx_reason: Why ``amx`` is what it is, in one line.
        inputs: What the key hashes: version, backend, flags, compilers, native ISA, Python.
        key: 16 hex digits of SHA-256 over ``inputs``; names the cached wheel's folder.
    """

    backend: str
    cmake_args: str
    amx: str
    amx_reason: str
    inputs: dict[str, object] = field(repr=False)
    key: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def _run(command: list[str]) -> str:
    """stdout of ``command``, or "" when it cannot run (tool missing or it failed)."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout if done.returncode == 0 else ""


def compiler_macros(cc: str, flags: list[str]) -> set[str]:
    """Macros defined to 1 by ``cc <flags>`` on an empty C file (ISA features among them)."""
    out = _run([cc, *flags, "-dM", "-E", "-x", "c", "/dev/null"])
    return {m.group(1) for line in out.splitlines() if (m := _ISA_MACRO.match(line))}


def native_isa(cc: str) -> list[str]:
    """Feature macros ``-march=native`` adds over the compiler's default target, sorted
    (e.g. ``__AVX2__``, ``__AMX_TILE__``); empty where the compiler has no ``-march=native``."""
    native = compiler_macros(cc, ["-march=native"])
    return sorted(native - compiler_macros(cc, [])) if native else []


def amx_disable_flags(isa: list[str]) -> list[str]:
    """``-mno-amx-*`` for each AMX feature in ``isa``: ``__AMX_INT8__`` → ``-mno-amx-int8``.

    GCC and Clang honour an explicit ``-mno-<feature>`` whatever its position relative to
    ggml's ``-march=native``, so these work from ``CMAKE_C_FLAGS``.
    """
    return [
        "-mno-amx-" + m.group(1).lower().replace("_", "-")
        for name in isa
        if (m := _AMX_MACRO.match(name))
    ]


def decide_amx(
    policy: str,
    isa: list[str],
    probe: Callable[[], ProbeResult],
    crashed_before: bool,
) -> tuple[str, str]:
    """(``not-in-play`` | ``on`` | ``off``, reason) for an AMX ``policy``.

    Raises:
        BuildPlanError: ``policy`` is ``on`` and the probe fails or AMX crashed here before.
    """
    if policy not in AMX_POLICIES:
        raise BuildPlanError(f"AMX must be one of {', '.join(AMX_POLICIES)}, not '{policy}'")
    if not amx_disable_flags(isa):
        return "not-in-play", "-march=native enables no AMX on this CPU"
    if policy == "off":
        return "off", "AMX=off"
    if crashed_before:
        if policy == "on":
            raise BuildPlanError("AMX=on, but llama.cpp's AMX path crashed on this machine")
        return "off", "llama.cpp's AMX path crashed on this machine before (SIGILL)"
    result = probe()
    if result.works:
        return "on", f"AMX probe: {result.detail}"
    if policy == "on":
        raise BuildPlanError(f"AMX=on, but the AMX probe failed: {result.detail}")
    return "off", f"AMX probe failed: {result.detail}"


def with_c_flags(cmake_args: str, flags: list[str]) -> str:
    """``cmake_args`` with ``flags`` added to ``CMAKE_C_FLAGS`` and ``CMAKE_CXX_FLAGS``
    (merged into values already there), quoted for scikit-build-core's shlex split."""
    if not flags:
        return cmake_args
    args = shlex.split(cmake_args)
    for variable in ("CMAKE_C_FLAGS", "CMAKE_CXX_FLAGS"):
        prefix = f"-D{variable}="
        found = [i for i, arg in enumerate(args) if arg.startswith(prefix)]
        if found:
            args[found[-1]] += " " + " ".join(flags)
        else:
            args.append(prefix + " ".join(flags))
    return shlex.join(args)


def _compiler_ids(backend: str) -> dict[str, str]:
    ids = {
        tool: (_run([tool, "--version"]).splitlines() or ["missing"])[0] for tool in ("cc", "c++")
    }
    if backend == "cuda":
        ids["nvcc"] = (_run(["nvcc", "--version"]).strip().splitlines() or ["missing"])[-1]
    return ids


def make_plan(
    backend: str,
    cmake_args: str | None,
    amx_policy: str,
    *,
    crashed_before: Callable[[list[str]], bool],
    cc: str = "cc",
    probe: Callable[[], ProbeResult] | None = None,
    isa: list[str] | None = None,
) -> BuildPlan:
    """The build for this machine.

    Args:
        backend: ``cpu``, ``cuda`` or ``metal``.
        cmake_args: The user's ``CMAKE_ARGS`` (None → the backend's default).
        amx_policy: ``auto``, ``on`` or ``off``.
        crashed_before: Whether llama.cpp's AMX path crashed before on a CPU with this ISA.
        cc: The C compiler that will build llama.cpp.
        probe: Runs the AMX probe (default: compile and run ``amx_probe.c`` with ``cc``).
        isa: What ``-march=native`` enables (default: asked of ``cc``); tests pass their own.

    Raises:
        BuildPlanError: unknown backend or AMX policy, or ``AMX=on`` where AMX faults.
    """
    if backend not in BACKEND_CMAKE_ARGS:
        raise BuildPlanError(f"BACKEND must be cpu, cuda or metal, not '{backend}'")
    base = BACKEND_CMAKE_ARGS[backend] if cmake_args is None else cmake_args
    native = not _PORTABLE.search(base)
    isa = (native_isa(cc) if native else []) if isa is None else isa
    amx, reason = decide_amx(amx_policy, isa, probe or (lambda: run_probe(cc)), crashed_before(isa))
    final = with_c_flags(base, amx_disable_flags(isa) if amx == "off" else [])
    inputs: dict[str, object] = {
        "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION,
        "backend": backend,
        "cmake_args": final,
        "compilers": _compiler_ids(backend),
        # A native build is tied to this CPU's instruction set; a wheel from another is not reused.
        "native_isa": isa if native else "portable",
        "python": f"{sys.implementation.cache_tag}-{platform.system()}-{platform.machine()}",
    }
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    return BuildPlan(backend, final, amx, reason, inputs, digest)
