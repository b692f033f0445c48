"""KV cache element types: the names ``models.yaml`` takes (``cache_type_k`` /
``cache_type_v``), their ggml type ids and their sizes, read from gguf-py's tables.

The names are llama.cpp's own list (``common/arg.cpp``: ``kv_cache_types``), spelled as its
``--cache-type-k`` takes them. A quantized V cache needs flash attention (llama.cpp refuses a
context otherwise); a quantized type's block (32 elements) must divide the head size.
"""

from __future__ import annotations

from typing import Literal, get_args

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

KvCacheType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]
KV_CACHE_TYPES: tuple[str, ...] = get_args(KvCacheType)
# llama.cpp's ``flash_attn_type``: auto (on where the backend supports it), on, off.
FlashAttn = Literal["auto", "on", "off"]


def _ggml(name: str) -> GGMLQuantizationType:
    """Raises: KeyError: not a KV cache type."""
    if name not in KV_CACHE_TYPES:
        raise KeyError(name)
    return GGMLQuantizationType[name.upper()]


def ggml_type(name: str) -> int:
    """``"q8_0"`` → ggml's type id (``enum ggml_type``: 8), as ``llama_context_params``
    ``type_k`` / ``type_v`` take it. Raises: KeyError: not a KV cache type."""
    return int(_ggml(name).value)


def row_bytes(name: str, n_elements: int) -> int:
    """Bytes of ``n_elements`` values of this type (ggml's row size: whole blocks of
    ``block`` elements, ``size`` bytes each; f16 is 2 bytes per element, q8_0 34 per 32,
    q4_0 18 per 32). Raises: KeyError: not a KV cache type."""
    block, size = GGML_QUANT_SIZES[_ggml(name)]
    return -(-n_elements // block) * size


def is_quantized(name: str) -> bool:
    """A block-quantized type (every type but f32, f16 and bf16): as a V cache it needs
    flash attention. Raises: KeyError: not a KV cache type."""
    block, _size = GGML_QUANT_SIZES[_ggml(name)]
    return block > 1
