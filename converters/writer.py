"""Stream planned tensors into a GGUF file with ``gguf.GGUFWriter``, atomically.

Tensor infos are declared first (shapes and types are known from the plan), then each
tensor is streamed: rows are read, fixed up and encoded a chunk at a time
(``CHUNK_BYTES`` of float32), so peak memory is a fixed margin whatever the model or
tensor size. The file is written under a temporary name in the target folder and renamed
into place only when complete; a temporary left by a killed writer is removed by the next
write of the same file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from tqdm import tqdm

from ggufserve.converters.checkpoint import TensorRef
from ggufserve.converters.errors import OutputExistsError, TensorMappingError

CHUNK_BYTES = 32 * 2**20  # float32 working set of one chunk: 32 MiB
# A failed write that leaves less than this free on its file system ran out of space: 1 MiB.
DISK_FULL_MARGIN_BYTES = 2**20
# Suffixes of the temporaries beside an output (``atomic_path`` and the quality scratch file).
TEMP_SUFFIXES = (".partial", ".scratch")
# --outtype → GGML type of 2-D weights; 1-D tensors (norms, biases) always stay F32.
OUTTYPES = {"f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16, "q8_0": QT.Q8_0}
# GGUF general.file_type (llama_ftype) of each --outtype.
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor.

    Attributes:
        name: GGUF tensor name (e.g. ``blk.0.attn_q.weight``).
        source: The checkpoint tensor it is made from.
        shape: Output shape in numpy/PyTorch order; GGML's ``ne`` is the reverse
            (``ne[0]`` is the last, contiguous axis). Axis 0 has the source's rows; the
            trailing axes are the source's unless ``transform`` changes them.
        transform: Row-wise fix-up, or None: element-wise (e.g. ``+1`` on a norm) or a
            per-row slice/transpose (e.g. one expert's matrix); applied chunk by chunk
            of rows, so it must not mix rows.
        force_type: A GGML type this tensor must have whatever ``--outtype`` says.
        float_only: F16 when ``--outtype`` is f16, else F32 (a convolution kernel: clip.cpp
            takes F16/F32 only; llama.cpp's ``MmprojModel.tensor_force_quant``).
    """

    name: str
    source: TensorRef
    shape: tuple[int, ...]
    transform: Callable[[np.ndarray], np.ndarray] | None = None
    force_type: QT | None = None
    float_only: bool = False


class _StreamedTensor:
    """What ``GGUFWriter.write_tensor_data`` uses of an array (``nbytes``, ``tofile``),
    producing the encoded bytes chunk by chunk instead of holding the whole tensor."""

    def __init__(self, tensor: PlannedTensor, ttype: QT, nbytes: int):
        self.tensor = tensor
        self.ttype = ttype
        self.nbytes = nbytes

    def tofile(self, handle: BinaryIO) -> None:
        tensor = self.tensor
        rows = tensor.shape[0] if tensor.shape else 1
        row_bytes = 4 * max(1, int(np.prod(tensor.shape[1:], dtype=np.int64)))
        step = max(1, CHUNK_BYTES // row_bytes)
        written = 0
        for start in range(0, rows, step):
            data = tensor.source.load(start, min(rows, start + step))
            if tensor.transform is not None:
                data = tensor.transform(data)
            if data.shape[1:] != tensor.shape[1:]:
                raise TensorMappingError(
                    f"{tensor.source.name}: fix-up gave rows of shape {data.shape[1:]}, "
                    f"planned {tensor.shape[1:]}"
                )
            encoded = encode(data, self.ttype)
            encoded.tofile(handle)
            written += encoded.nbytes
        if written != self.nbytes:
            raise TensorMappingError(
                f"{tensor.source.name}: wrote {written} bytes, planned {self.nbytes}"
            )


def output_type(tensor: PlannedTensor, outtype: QT) -> QT:
    """The GGML type a tensor is written in (Q8_0 needs rows divisible by 32, else F16)."""
    if tensor.force_type is not None:
        return tensor.force_type
    if tensor.float_only:
        return QT.F16 if outtype == QT.F16 else QT.F32
    if len(tensor.shape) == 1:
        return QT.F32
    if outtype == QT.Q8_0 and tensor.shape[-1] % gguf.GGML_QUANT_SIZES[QT.Q8_0][0] != 0:
        return QT.F16
    return outtype


def encode(data: np.ndarray, qtype: QT) -> np.ndarray:
    """float32 data → the bytes (or F32/F16 array) of a GGML type, via gguf-py's quants."""
    if qtype == QT.F32:
        return data.astype(np.float32, copy=False)
    if qtype == QT.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary name beside ``path``; rename it to ``path`` if the block succeeds,
    delete it if the block fails (so no partial file is ever left under either name).

    The temporary exists (empty) and stays locked (``flock``) by this process until the
    block ends, so the temporaries of a writer that was killed (SIGKILL, power loss) are
    told from live ones: :func:`sweep_stale` removes them first.

    Raises:
        OSError: the folder is missing or not writable.
    """
    sweep_stale(path)
    tmp, lock = _locked_temp(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    finally:
        lock.close()


def _locked_temp(path: Path) -> tuple[Path, BinaryIO]:
    """A new ``.<name>.<hex>.partial`` beside ``path``, created and locked by this process."""
    while True:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
        handle = open(tmp, "xb")  # noqa: SIM115 (held until the caller's block ends)
        fcntl.flock(handle, fcntl.LOCK_EX)
        # A sweep may have removed it between open and lock: then take another name.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(tmp).st_ino == os.fstat(handle.fileno()).st_ino:
                return tmp, handle
        handle.close()


def sweep_stale(path: Path) -> None:
    """Remove the temporaries of ``path`` (``.<name>.*.partial`` / ``.scratch``, and theirs)
    left by a writer that died; nothing while a live writer of ``path`` holds one."""
    stem = path.name.lstrip(".") + "."
    try:
        found = [
            p
            for p in path.parent.iterdir()
            if p.name.startswith(".")
            and p.name.lstrip(".").startswith(stem)
            and p.name.endswith(TEMP_SUFFIXES)
        ]
    except OSError:  # no folder yet: nothing to sweep
        return
    if any(_held(p) for p in found if p.name.endswith(".partial")):
        return
    for stale in found:
        with contextlib.suppress(OSError):
            stale.unlink()


def _held(path: Path) -> bool:
    """Whether a live process holds the lock of temporary ``path``."""
    try:
        with open(path, "rb") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def disk_full(folder: Path) -> bool:
    """Whether the file system holding ``folder`` has (almost) no space left for us."""
    try:
        stats = os.statvfs(folder)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < DISK_FULL_MARGIN_BYTES


def disk_full_error(path: Path) -> OSError:
    """The ``OSError`` (ENOSPC) the CLIs report for a write to ``path`` that ran out of space."""
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def check_output(path: Path, force: bool) -> None:
    """Raises: OutputExistsError if ``path`` exists (even as a dangling link), unless ``force``."""
    if (path.exists() or path.is_symlink()) and not force:
        raise OutputExistsError(f"{path} exists; pass --force to replace it")


def write_gguf(
    path: Path,
    arch: str,
    set_metadata: Callable[[gguf.GGUFWriter], None],
    tensors: list[PlannedTensor],
    outtype: str,
    *,
    force: bool,
    progress_label: str,
) -> Path:
    """Write a complete GGUF at ``path`` (replacing a symlink itself, never its target).

    ``set_metadata`` is called once every tensor info is declared, so it can read the
    parameter count from the writer.

    Raises:
        OutputExistsError: ``path`` exists and ``force`` is False.
        TensorMappingError: a fix-up produced a shape other than planned.
        OSError: the folder is not writable, or the disk is full (errno ENOSPC); the
            partial file is removed.
    """
    check_output(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            _write_all(writer, set_metadata, tensors, outtype, progress_label)
            writer.close()
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        except OSError as exc:
            with contextlib.suppress(OSError):  # its buffer cannot be flushed either
                writer.close()
            # numpy's tofile reports a full disk without an errno ("Not enough free space
            # to write ...", from its fallocate check): name it for the CLIs.
            if exc.errno != errno.ENOSPC and ("free space" in str(exc) or disk_full(path.parent)):
                raise disk_full_error(path) from None
            raise
    return path


def _write_all(
    writer: gguf.GGUFWriter,
    set_metadata: Callable[[gguf.GGUFWriter], None],
    tensors: list[PlannedTensor],
    outtype: str,
    progress_label: str,
) -> None:
    """Declare every tensor, write the header, metadata and tensor infos, then stream the
    tensor data (see :func:`write_gguf`)."""
    qtype = OUTTYPES[outtype]
    types = [output_type(t, qtype) for t in tensors]
    sizes = []
    for tensor, ttype in zip(tensors, types, strict=True):
        byte_shape = gguf.quant_shape_to_byte_shape(tensor.shape, ttype)
        if ttype in (QT.F32, QT.F16):
            dtype = np.dtype(np.float32 if ttype == QT.F32 else np.float16)
            nbytes = int(np.prod(tensor.shape)) * dtype.itemsize
            writer.add_tensor_info(tensor.name, tensor.shape, dtype, nbytes)
        else:
            nbytes = int(np.prod(byte_shape))
            writer.add_tensor_info(tensor.name, byte_shape, np.dtype(np.uint8), nbytes, ttype)
        sizes.append(nbytes)
    # After the tensor infos: general.size_label counts the written parameters
    # (GGUFWriter.get_total_parameter_count), as llama.cpp's converter does.
    set_metadata(writer)
    writer.add_file_type(FILE_TYPES[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor, ttype, nbytes in tqdm(
        list(zip(tensors, types, sizes, strict=True)), desc=progress_label, unit="tensor"
    ):
        # Duck-typed: the writer pads, then calls tofile(), which streams the chunks.
        writer.write_tensor_data(_StreamedTensor(tensor, ttype, nbytes))  # type: ignore[arg-type]
