"""A tiny generation in a child process: does the installed llama.cpp run on this machine?

A build that uses an instruction the CPU cannot execute dies with SIGILL on its first
matrix multiply; in a child that is a return code, not a dead server. The parent side is
standard library only, so the Makefile can run it before the project's imports work.

Child: ``python -m ggufserve.native.smoke MODEL_GGUF N_GPU_LAYERS`` prints one JSON line.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SMOKE_TIMEOUT_S = 300
SMOKE_TOKENS = 8
# Long enough that prompt processing multiplies a batch of rows (ggml's AMX/repack paths).
SMOKE_PROMPT = "The quick brown fox jumps over the lazy dog. " * 4
REBUILD_HINT = "make install FORCE_REBUILD=1 AMX=off"


@dataclass(frozen=True)
class SmokeResult:
    """Outcome of one smoke generation.

    Attributes:
        ok: The child generated and exited 0.
        signal_name: The signal that killed the child (e.g. ``SIGILL``), or None.
        summary: One line: what happened and, on failure, the fix.
        seconds: Wall time of the child, in seconds.
    """

    ok: bool
    signal_name: str | None
    summary: str
    seconds: float


def run_smoke(
    model: Path,
    n_gpu_layers: int = 0,
    python: str = sys.executable,
    timeout_s: float = SMOKE_TIMEOUT_S,
) -> SmokeResult:
    """Load ``model`` and generate a few tokens in a child process. Raises nothing."""
    started = time.monotonic()
    command = [python, "-m", "ggufserve.native.smoke", str(model), str(n_gpu_layers)]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, check=False,
            cwd=Path(__file__).resolve().parents[2],
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return SmokeResult(
            False,
            None,
            f"llama.cpp did not finish a tiny generation in {timeout_s:.0f} s",
            timeout_s,
        )
    seconds = time.monotonic() - started
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        what = "Illegal instruction: this build uses CPU instructions this machine cannot run"
        reason = what if name == "SIGILL" else f"killed by {name}"
        return SmokeResult(
            False,
            name,
            f"llama.cpp crashed on a tiny generation ({name}, {reason}); fix: {REBUILD_HINT}",
            seconds,
        )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return SmokeResult(
            False,
            None,
            f"llama.cpp failed a tiny generation (exit {done.returncode}: {last})",
            seconds,
        )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return SmokeResult(
        True, None, f"generated {report['tokens']} tokens in {report['seconds']:.2f} s", seconds
    )


def _child(model: str, n_gpu_layers: int) -> None:
    import llama_cpp

    started = time.monotonic()
    llama = llama_cpp.Llama(
        model, n_ctx=256, n_batch=64, n_gpu_layers=n_gpu_layers, verbose=False, seed=1
    )
    prompt = llama.tokenize(SMOKE_PROMPT.encode(), add_bos=True)
    tokens = 0
    for _ in llama.generate(prompt, temp=0.0):
        tokens += 1
        if tokens == SMOKE_TOKENS:
            break
    print(json.dumps({"tokens": tokens, "seconds": time.monotonic() - started}))


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]))
