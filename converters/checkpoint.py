"""A Hugging Face checkpoint folder: config, tokenizer files and lazily read tensors.

Everything is validated before anything is written: the index against the shards, every
shard header (by the ``safetensors`` library: header size, JSON, offsets, byte counts,
dtypes), and the weight formats (pickle formats and remote code are refused). Tensor
data is read a range of rows at a time from a memory map, so memory does not grow with
the model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.utility import SafetensorsLocal
from safetensors import SafetensorError, safe_open

from ggufserve.converters.errors import CheckpointError, ConfigError, SafetensorsError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# safetensors dtype → numpy dtype of the stored elements (BF16 is widened by hand below).
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes are, and what they are.

    Attributes:
        name: Name as stored in the checkpoint.
        dtype: safetensors dtype (``F32``, ``F16`` or ``BF16``).
        shape: PyTorch order, e.g. ``(out_features, in_features)`` for a Linear weight.
        path / offset / nbytes: Byte range in the shard.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    offset: int
    nbytes: int

    @property
    def n_rows(self) -> int:
        """Length of axis 0 (1 for a scalar)."""
        return self.shape[0] if self.shape else 1

    def load(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` of axis 0 as float32 (all rows by default), shape
        ``(stop - start, *shape[1:])``. Only those bytes are mapped; the memory is
        released once the array is dropped."""
        stop = self.n_rows if stop is None else stop
        itemsize = np.dtype(DTYPES[self.dtype]).itemsize
        row_items = int(np.prod(self.shape[1:], dtype=np.int64)) if self.shape else 1
        count = (stop - start) * row_items
        data = np.memmap(
            self.path,
            dtype=DTYPES[self.dtype],
            mode="r",
            offset=self.offset + start * row_items * itemsize,
            shape=(count,),
        )
        if self.dtype == "BF16":
            # bfloat16 is the top half of a float32 (IEEE 754): widen by a 16-bit shift.
            widened = data.astype(np.uint32)
            widened <<= 16
            out = widened.view(np.float32)
        else:
            out = data.astype(np.float32)
        return out.reshape((stop - start, *self.shape[1:]) if self.shape else ())


class Checkpoint:
    """A validated checkpoint folder.

    Attributes:
        root: The folder.
        config: ``config.json`` as a dict.
        tensors: Every tensor by stored name.

    Raises (from :meth:`open`):
        CheckpointError: missing folder/config/weights, pickle-only weights, remote code,
            an index naming shards outside the folder or missing, names in two shards, or
            an index that disagrees with the shards.
        SafetensorsError: a shard whose header or layout is invalid, or an unsupported dtype.
        ConfigError: ``config.json`` is not a JSON object.
    """

    def __init__(self, root: Path, config: dict[str, Any], tensors: dict[str, TensorRef]):
        self.root = root
        self.config = config
        self.tensors = tensors

    @classmethod
    def open(cls, root: Path) -> Checkpoint:
        root = Path(root)
        if not root.is_dir():
            raise CheckpointError(f"not a checkpoint folder: {root}")
        config = read_json_object(root / "config.json", ConfigError)
        if "auto_map" in config:
            raise CheckpointError(
                "config.json has 'auto_map' (remote code); checkpoint code is never run"
            )
        shards = _shard_files(root)
        tensors: dict[str, TensorRef] = {}
        for shard in shards:
            for ref in _read_shard(shard):
                if ref.name in tensors:
                    raise CheckpointError(f"tensor '{ref.name}' appears in two shards")
                tensors[ref.name] = ref
        _check_index(root, tensors)
        return cls(root, config, tensors)

    def file(self, name: str) -> Path | None:
        """A tokenizer/preprocessor file in the folder, or None if absent."""
        path = self.root / name
        return path if path.is_file() else None

    def json_file(self, name: str) -> dict[str, Any] | None:
        """A JSON object file in the folder, or None if absent.

        Raises:
            CheckpointError: the file exists but is not a JSON object.
        """
        path = self.file(name)
        return None if path is None else read_json_object(path, CheckpointError)

    def image_processor_configs(self) -> list[dict[str, Any]]:
        """The image processor settings, most authoritative first: ``preprocessor_config.json``
        (Hub), then ``processor_config.json``'s ``image_processor`` (transformers 5); empty
        ones left out.

        Raises:
            CheckpointError: a file exists but is not a JSON object.
        """
        configs = []
        for name in ("preprocessor_config.json", "processor_config.json"):
            data = self.json_file(name) or {}
            data = data.get("image_processor", data)
            if isinstance(data, dict) and data:
                configs.append(data)
        return configs


def read_json_object(path: Path, error: type[Exception]) -> dict[str, Any]:
    """Read a JSON object file.

    Raises:
        error: missing, unreadable, invalid JSON, or not an object.
    """
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"missing {path.name}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path.name} is not readable JSON ({exc.__class__.__name__})") from None
    if not isinstance(value, dict):
        raise error(f"{path.name} must hold a JSON object")
    return value


def _inside(root: Path, name: str) -> Path:
    """Resolve a shard name from the index, refusing anything outside ``root``."""
    if not name or os.sep in name or (os.altsep and os.altsep in name) or name in (".", ".."):
        raise CheckpointError(f"index names a shard outside the checkpoint folder: {name!r}")
    path = root / name
    real = path.resolve()
    if real.parent != root.resolve():
        raise CheckpointError(f"index names a shard outside the checkpoint folder: {name!r}")
    return path


def _shard_files(root: Path) -> list[Path]:
    index = root / INDEX_FILE
    if index.is_file():
        weight_map = read_json_object(index, CheckpointError).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{INDEX_FILE} has no 'weight_map'")
        names = sorted({str(v) for v in weight_map.values()})
        shards = [_inside(root, name) for name in names]
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise CheckpointError(f"missing shard(s) named in {INDEX_FILE}: {', '.join(missing)}")
        return shards
    if (root / SINGLE_FILE).is_file():
        return [root / SINGLE_FILE]
    if any(p.suffix in PICKLE_SUFFIXES for p in root.iterdir()):
        raise CheckpointError(
            "only pickle weights (*.bin/*.pt) found; they can run code when loaded and are "
            "refused: convert them to safetensors first"
        )
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {root}")


def _read_shard(path: Path) -> list[TensorRef]:
    """Validate a shard with the safetensors library, then take its byte ranges."""
    try:
        metadata = {}
        with safe_open(path, framework="numpy") as handle:
            for name in handle.keys():  # noqa: SIM118 (a safe_open handle is no dict)
                view = handle.get_slice(name)
                metadata[name] = (view.get_dtype(), view.get_shape())
    except (SafetensorError, OSError, ValueError) as exc:
        raise SafetensorsError(f"{path.name}: invalid safetensors file ({_reason(exc)})") from None
    try:
        ranges = SafetensorsLocal(path).tensors
    except (ValueError, KeyError, UnicodeDecodeError) as exc:
        raise SafetensorsError(
            f"{path.name}: invalid safetensors header ({_reason(exc)})"
        ) from None
    refs = []
    for name, (dtype, shape) in metadata.items():
        if dtype not in DTYPES:
            raise SafetensorsError(f"{path.name}: tensor '{name}' has unsupported dtype {dtype}")
        local = ranges[name]
        refs.append(
            TensorRef(
                name, dtype, tuple(shape), path, local.data_range.offset, local.data_range.size
            )
        )
    return refs


def _reason(exc: Exception) -> str:
    """The library's first line, cut short: enough to act on, never a traceback."""
    text = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
    return text[:160]


def _check_index(root: Path, tensors: dict[str, TensorRef]) -> None:
    index = root / INDEX_FILE
    if not index.is_file():
        return
    weight_map = read_json_object(index, CheckpointError)["weight_map"]
    for name, shard in weight_map.items():
        ref = tensors.get(name)
        if ref is None or ref.path.name != shard:
            raise CheckpointError(f"{INDEX_FILE} places '{name}' in {shard}, which lacks it")
    extra = sorted(set(tensors) - set(weight_map))
    if extra:
        raise CheckpointError(f"shards hold tensors the index does not list: {extra[:3]}")
