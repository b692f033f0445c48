"""What the installed llama.cpp was built with and what it sees: backends and their
compiled-in features (``llama_print_system_info``), ggml devices, GPU offload, and the
build record ``make install`` left in the venv."""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import llama_cpp
from llama_cpp import _ggml

from ggufserve.native.wheels import installed_record

# ggml-backend.h: enum ggml_backend_dev_type.
DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}
AMX_FEATURES = ("AMX_INT8", "AMX_BF16", "AMX_TILE")


@dataclass(frozen=True)
class SystemInfo:
    """The loaded llama.cpp library, as it reports itself.

    Attributes:
        version: llama-cpp-python's version.
        backends: Backend name (``CPU``, ``CUDA``, ``Metal``...) → its features
            (``AVX2`` → ``1``, ``ARCHS`` → ``890``...), as ``llama_print_system_info`` lists.
        devices: ``name (type): description`` of each ggml device.
        gpu_offload: Whether layers can be offloaded (a GPU backend is loaded).
        build: The venv's build record (flags, AMX decision, cache key), if any.
        cpu_reports_amx: Whether ``/proc/cpuinfo`` lists ``amx_tile`` (Linux only).
    """

    version: str
    backends: dict[str, dict[str, str]]
    devices: list[str]
    gpu_offload: bool
    build: dict[str, object] | None
    cpu_reports_amx: bool

    @property
    def amx_compiled(self) -> bool:
        cpu = self.backends.get("CPU", {})
        return any(cpu.get(name) == "1" for name in AMX_FEATURES)

    def summary(self) -> str:
        """One line for the server log: backends, CPU features, AMX, GPU offload."""
        parts = []
        for name, features in self.backends.items():
            on = [key for key, value in features.items() if value == "1"]
            other = [f"{key}={value}" for key, value in features.items() if value != "1"]
            parts.append(f"{name} [{' '.join(on + other)}]")
        amx = "on" if self.amx_compiled else "off"
        return (
            f"llama-cpp-python {self.version}: {'; '.join(parts)}; AMX {amx}; "
            f"GPU offload {'yes' if self.gpu_offload else 'no'}"
        )


def parse_system_info(text: str) -> dict[str, dict[str, str]]:
    """``"CPU : SSE3 = 1 | AVX = 1 | CUDA : ARCHS = 890 | "`` → ``{"CPU": {"SSE3": "1",
    "AVX": "1"}, "CUDA": {"ARCHS": "890"}}`` (llama.cpp src/llama.cpp, llama_print_system_info)."""
    backends: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for item in (part.strip() for part in text.split("|")):
        if not item:
            continue
        if " : " in item:  # a new backend starts: "CPU : SSE3 = 1"
            name, item = (s.strip() for s in item.split(" : ", 1))
            current = backends.setdefault(name, {})
        key, _, value = (s.strip() for s in item.partition("="))
        if current is not None and key:
            current[key] = value
    return backends


def _devices() -> list[str]:
    lib = ctypes.CDLL(_ggml.libggml._name)
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    for name in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
        getattr(lib, name).restype = ctypes.c_char_p
        getattr(lib, name).argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_type.restype = ctypes.c_int
    lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    out = []
    for index in range(lib.ggml_backend_dev_count()):
        device = lib.ggml_backend_dev_get(index)
        kind = DEVICE_TYPES.get(lib.ggml_backend_dev_type(device), "other")
        name = lib.ggml_backend_dev_name(device).decode(errors="replace")
        description = lib.ggml_backend_dev_description(device).decode(errors="replace")
        out.append(f"{name} ({kind}): {description}")
    return out


def _cpu_reports_amx() -> bool:
    try:
        return " amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def system_info() -> SystemInfo:
    """Ask the loaded library (initialises llama.cpp's backends; cheap, no model)."""
    llama_cpp.llama_backend_init()
    text = llama_cpp.llama_print_system_info().decode(errors="replace")
    return SystemInfo(
        version=metadata.version("llama-cpp-python"),
        backends=parse_system_info(text),
        devices=_devices(),
        gpu_offload=bool(llama_cpp.llama_supports_gpu_offload()),
        build=installed_record(Path(sys.prefix)),
        cpu_reports_amx=_cpu_reports_amx(),
    )
