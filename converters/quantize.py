"""Quantize a GGUF with llama.cpp's own quantizer (``llama_model_quantize``), atomically.

llama.cpp runs in a child process: Python handles SIGINT only between bytecodes, so while
a ctypes call runs (minutes for a big model) Ctrl-C would wait for it. The parent waits on
the child instead; on Ctrl-C (or any error) it kills the child, waits for it to be gone,
then ``atomic_path`` removes the partial file. When the parent itself is killed (SIGKILL),
the child is killed with it (Linux ``PR_SET_PDEATHSIG``) and the next write of the same
output removes the partial file. (A plain subprocess rather than multiprocessing's spawn,
which would re-import the caller's ``__main__``.)
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ggufserve.converters.errors import QuantizationError
from ggufserve.converters.llama_logs import ErrorLines, captured_logs
from ggufserve.converters.progress import Progress, progress
from ggufserve.converters.writer import atomic_path, check_output, disk_full, disk_full_error

# Output type name (llama.cpp's `llama-quantize` spelling) → llama_ftype constant name.
QUANT_TYPES = {
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q5_K_S": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "Q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "Q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q4_K_S": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "IQ4_NL": "LLAMA_FTYPE_MOSTLY_IQ4_NL",
    "IQ4_XS": "LLAMA_FTYPE_MOSTLY_IQ4_XS",
    "Q3_K_L": "LLAMA_FTYPE_MOSTLY_Q3_K_L",
    "Q3_K_M": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "Q3_K_S": "LLAMA_FTYPE_MOSTLY_Q3_K_S",
    "Q2_K": "LLAMA_FTYPE_MOSTLY_Q2_K",
}
# llama-quant.cpp logs "[  12/ 236] blk.0.attn_k.weight - ..." before each tensor.
TENSOR_LINE = re.compile(r"\[\s*(\d+)/\s*(\d+)\]")
KV_TEXT_MAX = 127  # llama_model_kv_override: char key[128], char val_str[128]
RESULT_MARK = "ggufserve-quantizer-result "  # the child's last stdout line
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

MetadataValue = bool | int | float | str


@dataclass(frozen=True)
class QuantizerJob:
    """One ``llama_model_quantize`` call, as plain data for the child process."""

    source: str
    out: str
    quant: str | None  # type name, for the progress bar and errors; None: a copy, no bar
    ftype: int | None = None  # None with only_copy
    only_copy: bool = False
    kv: dict[str, MetadataValue] = field(default_factory=dict)
    n_threads: int = 0
    parent_pid: int = 0  # the child ends itself if this process is gone
    allow_requantize: bool = False  # the source may itself be quantized (quality loss)


def ftype_of(quant_type: str) -> int:
    """The ``llama_ftype`` of a type name. Raises: QuantizationError if the name is unknown."""
    import llama_cpp

    name = QUANT_TYPES.get(quant_type.upper())
    if name is None:
        known = ", ".join(QUANT_TYPES)
        raise QuantizationError(f"unknown quantization type '{quant_type}' (known: {known})")
    return int(getattr(llama_cpp, name))


def quantize(
    source: Path, target: Path, quant_type: str, *, force: bool, n_threads: int | None = None
) -> Path:
    """Write ``target``, a ``quant_type`` quantization of ``source`` (an F32/F16/BF16 GGUF).

    Raises:
        QuantizationError: unknown type, or llama.cpp's quantizer failed (the partial
            output is removed).
        OutputExistsError: ``target`` exists and not ``force``.
        OSError: the disk filled up (errno ENOSPC; the partial output is removed).
    """
    ftype = ftype_of(quant_type)
    check_output(target, force)
    threads = n_threads or os.cpu_count() or 1
    with atomic_path(target) as tmp:
        run_quantizer(
            QuantizerJob(str(source), str(tmp), quant_type.upper(), ftype, False, {}, threads)
        )
    return target


def copy_with_metadata(source: Path, out: Path, metadata: Mapping[str, MetadataValue]) -> None:
    """Write ``out``: ``source`` with its tensors copied byte for byte and ``metadata`` keys
    added (llama.cpp's quantizer with ``only_copy`` and ``kv_overrides``). Integers are
    stored as UINT32 and floats as FLOAT32, as llama.cpp does for overrides.

    Raises:
        QuantizationError: a key or string longer than 127 bytes, an integer outside UINT32,
            or llama.cpp failed.
    """
    for key, value in metadata.items():
        text = value if isinstance(value, str) else ""
        if len(key.encode()) > KV_TEXT_MAX or len(text.encode()) > KV_TEXT_MAX:
            raise QuantizationError(f"metadata {key!r}: key or value longer than {KV_TEXT_MAX} B")
        if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value < 2**32:
            raise QuantizationError(f"metadata {key!r}: {value} does not fit a UINT32")
    run_quantizer(QuantizerJob(str(source), str(out), None, only_copy=True, kv=dict(metadata)))


def run_quantizer(job: QuantizerJob) -> None:
    """Run one ``llama_model_quantize`` in a child process (``python -m
    ggufserve.converters.quantize``, the job as JSON on stdin), interruptibly.

    Raises:
        QuantizationError: llama.cpp returned non-zero (with its last error line) or the
            child died (e.g. killed for memory).
        OSError: llama.cpp failed with the output's disk full (errno ENOSPC).
        KeyboardInterrupt: the child is terminated and waited for before this propagates.
    """
    job = replace(job, parent_pid=os.getpid())
    # Its own session: a terminal's Ctrl-C reaches only this process, which ends the child.
    child = subprocess.Popen(
        [sys.executable, "-m", "ggufserve.converters.quantize"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        output, _ = child.communicate(json.dumps(asdict(job)).encode())
    except BaseException:
        child.kill()  # it is inside the ctypes call: no handler would run anyway
        child.wait()
        raise
    source = Path(job.source).name
    lines = output.decode(errors="replace").strip().splitlines()
    if child.returncode != 0 or not lines or not lines[-1].startswith(RESULT_MARK):
        raise QuantizationError(f"llama.cpp's quantizer died on {source} ({_exit(child)})")
    status, error = json.loads(lines[-1][len(RESULT_MARK) :])
    if status != 0 or not Path(job.out).is_file():
        # llama.cpp's message for a failed write is a bare iostream error: say what it was.
        if disk_full(Path(job.out).parent):
            raise disk_full_error(Path(job.out))
        what = f"quantize {source} to {job.quant}" if job.quant else f"copy {source}"
        raise QuantizationError(f"llama.cpp could not {what}" + (f": {error}" if error else ""))


def _exit(child: subprocess.Popen[bytes]) -> str:
    code = child.returncode
    if code is not None and code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


def _child_main() -> None:
    """The child: one llama_model_quantize call; prints RESULT_MARK [status, last error]."""
    import llama_cpp

    job = QuantizerJob(**json.loads(sys.stdin.read()))
    _die_with_parent(job.parent_pid)
    params = llama_cpp.llama_model_quantize_default_params()
    if job.ftype is not None:
        params.ftype = job.ftype
    params.nthread = job.n_threads
    params.only_copy = job.only_copy
    params.allow_requantize = job.allow_requantize
    overrides = _kv_overrides(job.kv) if job.kv else None
    if overrides is not None:
        params.kv_overrides = overrides
    errors = ErrorLines()
    bar: list[Progress] = []

    def on_line(level: int, text: str) -> None:
        errors(level, text)
        match = TENSOR_LINE.match(text)
        if match and job.quant:
            if not bar:
                bar.append(progress(int(match[2]), f"quantize {job.quant}", "tensors"))
            bar[0].update(1)

    with captured_logs(on_line):
        status = llama_cpp.llama_model_quantize(
            job.source.encode(), job.out.encode(), ctypes.byref(params)
        )
    for each in bar:
        each.close()
    print(RESULT_MARK + json.dumps([int(status), errors.last()]), flush=True)


def _die_with_parent(parent_pid: int) -> None:
    """Linux: have the kernel kill this child when its parent dies, so a killed ``pull`` or
    ``convert`` leaves no quantizer writing on (elsewhere the parent's Ctrl-C path only)."""
    if not sys.platform.startswith("linux") or not parent_pid:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # it died before the prctl call
        os._exit(1)


def _kv_overrides(kv: Mapping[str, MetadataValue]) -> ctypes.Array[Any]:
    """A ``llama_model_kv_override`` array ended by an entry with an empty key."""
    import llama_cpp

    entries = (llama_cpp.llama_model_kv_override * (len(kv) + 1))()  # zeroed: last one ends it
    for entry, (key, value) in zip(entries, kv.items(), strict=False):
        entry.key = key.encode()
        if isinstance(value, bool):
            entry.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_BOOL
            entry.value.val_bool = value
        elif isinstance(value, int):
            entry.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
            entry.value.val_i64 = value
        elif isinstance(value, float):
            entry.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_FLOAT
            entry.value.val_f64 = value
        else:
            entry.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
            entry.value.val_str = value.encode()
    return entries


if __name__ == "__main__":
    _child_main()
