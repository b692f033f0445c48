"""``ggufserve doctor``: what llama.cpp was built with, and whether it runs here.

Prints the build (backend, compiled-in CPU features, AMX on/off, GPU offload, the flags
and cache key ``make install`` used), then, for each chosen model, a tiny generation in a
child process: a library that dies (SIGILL on an instruction this CPU cannot run) is one
line with the fix, not a core dump.
"""

from __future__ import annotations

from pathlib import Path

from ggufserve.models.model_files import resolve
from ggufserve.native.smoke import run_smoke
from ggufserve.native.sysinfo import SystemInfo, system_info
from ggufserve.settings import ModelEntry


def _build_lines(info: SystemInfo) -> list[str]:
    build = info.build
    if build is None:
        return ["build      : not recorded (llama-cpp-python was not installed by `make install`)"]
    return [
        f"build      : backend {build['backend']}, key {build['key']}, "
        f"CMAKE_ARGS '{build['cmake_args']}'",
        f"AMX policy : {build['amx']} ({build['amx_reason']})",
    ]


def report(info: SystemInfo) -> list[str]:
    """The build and system lines of the report."""
    lines = [f"llama.cpp  : {info.summary()}"]
    lines += [f"device     : {device}" for device in info.devices]
    lines += _build_lines(info)
    lines.append(
        f"AMX        : compiled in: {'yes' if info.amx_compiled else 'no'}; "
        f"CPU reports AMX: {'yes' if info.cpu_reports_amx else 'no'}"
    )
    return lines


def doctor(entries: list[ModelEntry], base_dir: Path, *, smoke: bool = True) -> int:
    """Print the report, then smoke-test each entry's GGUF. Returns the exit code:
    0 all good, 1 a model could not be resolved or its generation failed."""
    for line in report(system_info()):
        print(line)
    status = 0
    for entry in entries if smoke else []:
        where = f"smoke      : {entry.id} (n_gpu_layers {entry.n_gpu_layers})"
        try:
            path = resolve(entry.gguf, base_dir)
        except Exception as exc:  # ModelsFileError and hub errors: report, keep going
            print(f"{where}: FAIL: cannot resolve the GGUF: {exc}")
            status = 1
            continue
        result = run_smoke(path, entry.n_gpu_layers)
        print(f"{where}: {'ok' if result.ok else 'FAIL'}: {result.summary}")
        status = status if result.ok else 1
    return status
