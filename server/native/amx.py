"""Compile and run ``amx_probe.c``: do Intel AMX tile instructions really execute here?

Standard library only (runs before the project is installed).
"""

from __future__ import annotations

import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

PROBE_SOURCE = Path(__file__).with_name("amx_probe.c")
PROBE_TIMEOUT_S = 20


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of one probe run.

    Attributes:
        works: Tile instructions executed in a worker thread.
        detail: One line for logs and ``doctor`` (why it failed, or that it worked).
    """

    works: bool
    detail: str


def run_probe(cc: str = "cc", source: Path = PROBE_SOURCE) -> ProbeResult:
    """Compile ``source`` with ``-mamx-tile`` and run it in a child process.

    A probe killed by a signal (SIGILL on machines whose AMX faults) is a failure, never
    an exception. Raises nothing: a compiler that cannot build the probe is a failure too.
    """
    with tempfile.TemporaryDirectory(prefix="ggufserve-amx-") as folder:
        binary = Path(folder) / "amx_probe"
        compiled = subprocess.run(
            [cc, "-O0", "-mamx-tile", "-pthread", str(source), "-o", str(binary)],
            capture_output=True,
            text=True,
            check=False,
        )
        if compiled.returncode != 0:
            return ProbeResult(False, f"the AMX probe does not compile with {cc}")
        try:
            ran = subprocess.run(
                [str(binary)], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired:
            return ProbeResult(False, "the AMX probe hung")
    if ran.returncode < 0:
        name = signal.Signals(-ran.returncode).name
        return ProbeResult(False, f"tile instructions fault in a worker thread ({name})")
    if ran.returncode != 0:
        return ProbeResult(False, ran.stdout.strip() or f"the AMX probe failed ({ran.returncode})")
    return ProbeResult(True, ran.stdout.strip())
