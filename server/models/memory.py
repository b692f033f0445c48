"""The memory budget of the loaded models: sizes, the per-model estimate, eviction plans.

A model's memory is **estimated** before it loads, from its files and GGUF metadata::

    GGUF file(s) + mmproj file + n_ctx × Σ_layers n_head_kv × (k × B_k + v × B_v)
                               [+ n_ctx × Σ_layers n_head_kv × (k + v) × 2 B]
                               [+ draft GGUF + n_ctx × Σ_draft layers n_head_kv × (k + v) × 2 B]

the second term being the generation context's KV cache, B_k / B_v the bytes per element
of ``cache_type_k`` / ``cache_type_v`` (f16: 2, q8_0: 34/32, q4_0: 18/32, from gguf-py's
``GGML_QUANT_SIZES``), and the bracket the f16 KV cache of the embedding context
(``embeddings: true``), the last bracket a draft model (``speculative: {type: draft}``)
with its f16 KV cache of ``n_ctx`` cells. Each layer holds ``n_ctx`` cells (exact with
``swa_full: true``, the default; an overestimate for sliding-window layers otherwise).
llama.cpp's compute buffers, the logits buffer and the image cache are not counted: leave
some headroom under the machine's real memory. The same figure is kept while the model
is loaded, so the accounting never depends on what the allocator did.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ggufserve.converters.gguf_meta import read_metadata
from ggufserve.engine.kv_cache import KvCacheType, row_bytes

log = logging.getLogger(__name__)

MiB = 1024 * 1024
# Unit → bytes: K/M/G/T and KiB..TiB are binary (as llama.cpp and Docker read "8G");
# KB/MB/GB/TB are decimal.
_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kib": 1024, "kb": 1000,
    "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
    "g": 1024**3, "gib": 1024**3, "gb": 1000**3,
    "t": 1024**4, "tib": 1024**4, "tb": 1000**4,
}  # fmt: skip
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)")
# One part of a split GGUF (llama.cpp's gguf-split naming): groups (part, count).
SPLIT_GGUF = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")
_SIZE_HELP = "a memory size is bytes or a number with a unit: '512MiB', '4GiB', '8GB', '8G'"


def parse_bytes(value: Any) -> int:
    """A memory size → bytes: an int, or a string such as ``"4GiB"``, ``"512MiB"``,
    ``"8GB"`` (decimal), ``"8G"`` (binary) or ``"1073741824"``.

    Raises:
        ValueError: not a positive size, or an unknown unit.
    """
    if isinstance(value, bool):
        raise ValueError(_SIZE_HELP)
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (match := _SIZE.fullmatch(value.strip().lower())):
        number, unit = match.groups()
        if unit not in _UNITS:
            raise ValueError(_SIZE_HELP)
        size = int(float(number) * _UNITS[unit])
    else:
        raise ValueError(_SIZE_HELP)
    if size <= 0:
        raise ValueError("a memory size must be positive")
    return size


def parse_budget(value: Any) -> int | None:
    """``--max-memory``: a size (see :func:`parse_bytes`), or None / "" / "none" for no
    budget."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    return parse_bytes(value)


def mib(n_bytes: int) -> str:
    """``1234567890`` → ``"1177 MiB"`` (for messages)."""
    return f"{n_bytes / MiB:.0f} MiB"


def file_bytes(path: Path) -> int:
    """Size of a GGUF on disk, all parts of a split one (``-00001-of-00003.gguf``)."""
    match = SPLIT_GGUF.search(path.name)
    if match is None:
        return path.stat().st_size
    parts = int(match.group(2))
    stem = path.name[: match.start()]
    siblings = [path.with_name(f"{stem}-{i:05d}-of-{parts:05d}.gguf") for i in range(1, parts + 1)]
    return sum(p.stat().st_size for p in siblings if p.is_file())


def kv_bytes_per_token(path: Path, type_k: KvCacheType = "f16", type_v: KvCacheType = "f16") -> int:
    """KV cache bytes one token takes over all layers, keys stored as ``type_k`` and
    values as ``type_v``, from the GGUF's metadata (``block_count``,
    ``attention.head_count_kv`` (a number or one per layer), ``attention.key_length`` /
    ``value_length``, default ``embedding_length / head_count``). 0 when the header
    cannot be read or names no attention (the load itself then reports a broken file)."""
    meta = read_metadata(path, arrays=_per_layer)
    if meta is None:
        log.warning("cannot read the GGUF header of %s for the memory estimate", path.name)
        return 0
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        return 0
    n_layer = _number(meta.get(f"{arch}.block_count"))
    n_head = _heads(meta.get(f"{arch}.attention.head_count"), n_layer)
    n_head_kv = _heads(meta.get(f"{arch}.attention.head_count_kv"), n_layer) or n_head
    n_embd = _number(meta.get(f"{arch}.embedding_length"))
    head_dim = n_embd // max(1, max(n_head, default=1))
    k = _number(meta.get(f"{arch}.attention.key_length")) or head_dim
    v = _number(meta.get(f"{arch}.attention.value_length")) or head_dim
    return sum(row_bytes(type_k, heads * k) + row_bytes(type_v, heads * v) for heads in n_head_kv)


def _per_layer(key: str) -> bool:
    """``<arch>.attention.head_count[_kv]``: an array (one per layer) on some models."""
    return key.endswith((".attention.head_count", ".attention.head_count_kv"))


def _number(value: Any) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


def _heads(value: Any, n_layer: int) -> list[int]:
    """Heads per layer: a per-layer array as given, a single number for every layer."""
    if isinstance(value, list):
        return [int(v) for v in value[:n_layer]]
    return [_number(value)] * n_layer if _number(value) else []


def estimate_bytes(
    gguf: Path,
    mmproj: Path | None,
    *,
    n_ctx: int,
    type_k: KvCacheType = "f16",
    type_v: KvCacheType = "f16",
    embeddings: bool = False,
    draft: Path | None = None,
) -> int:
    """The module docstring's estimate for one model (bytes).

    Args:
        gguf: The model file (first part of a split one).
        mmproj: The vision projector file, if any.
        n_ctx: Context size of each context, in tokens.
        type_k / type_v: The generation context's KV cache types (``cache_type_k/v``).
        embeddings: An embedding context (f16 KV, ``n_ctx`` cells) is made too.
        draft: A draft model's GGUF, loaded with its own context (f16 KV, ``n_ctx`` cells).

    Raises:
        OSError: a file cannot be read.
    """
    files = file_bytes(gguf) + (mmproj.stat().st_size if mmproj is not None else 0)
    kv = kv_bytes_per_token(gguf, type_k, type_v)
    if embeddings:
        kv += kv_bytes_per_token(gguf)
    if draft is not None:
        files += file_bytes(draft)
        kv += kv_bytes_per_token(draft)
    return files + n_ctx * kv


@dataclass(frozen=True)
class Resident:
    """A loaded model as the eviction plan sees it."""

    id: str
    memory_bytes: int
    busy: bool  # requests in flight: not evictable
    last_used: float  # monotonic seconds


def plan_eviction(need: int, budget: int, loaded: list[Resident]) -> list[str] | None:
    """The idle models to unload, least recently used first, so that ``need`` more bytes
    fit in ``budget``; ``[]`` when they fit already; None when even unloading every idle
    model would not make room (nothing should be evicted then).

    Raises:
        ValueError: ``need`` exceeds ``budget`` on its own.
    """
    if need > budget:
        raise ValueError("the model alone exceeds the budget")
    used = sum(r.memory_bytes for r in loaded)
    idle = sorted((r for r in loaded if not r.busy), key=lambda r: r.last_used)
    if used - sum(r.memory_bytes for r in idle) + need > budget:
        return None
    victims: list[str] = []
    for resident in idle:
        if used + need <= budget:
            break
        victims.append(resident.id)
        used -= resident.memory_bytes
    return victims
