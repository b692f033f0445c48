"""Read scalar metadata of a GGUF with ggml's own parser (``gguf_init_from_file``, no
tensor data), reached through the library llama-cpp-python loads: ~0.1 s for Gemma 3,
where gguf-py's GGUFReader parses the 262k-token vocabulary in Python for ~20 s."""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ggufserve.converters.llama_logs import captured_logs

# enum gguf_type (gguf.h) → ctypes result type of its gguf_get_val_* reader.
SCALAR_READERS: dict[int, tuple[str, Any]] = {
    0: ("gguf_get_val_u8", ctypes.c_uint8),
    1: ("gguf_get_val_i8", ctypes.c_int8),
    2: ("gguf_get_val_u16", ctypes.c_uint16),
    3: ("gguf_get_val_i16", ctypes.c_int16),
    4: ("gguf_get_val_u32", ctypes.c_uint32),
    5: ("gguf_get_val_i32", ctypes.c_int32),
    6: ("gguf_get_val_f32", ctypes.c_float),
    7: ("gguf_get_val_bool", ctypes.c_bool),
    8: ("gguf_get_val_str", ctypes.c_char_p),
    10: ("gguf_get_val_u64", ctypes.c_uint64),
    11: ("gguf_get_val_i64", ctypes.c_int64),
    12: ("gguf_get_val_f64", ctypes.c_double),
}


class _InitParams(ctypes.Structure):
    """struct gguf_init_params { bool no_alloc; struct ggml_context ** ctx; }"""

    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


@functools.cache
def _ggml() -> ctypes.CDLL:
    """The library exporting gguf_*: llama's handle finds its dependency's symbols on
    Linux/macOS; elsewhere ggml-base is loaded from llama-cpp-python's folder."""
    from llama_cpp import llama_cpp as bindings

    if hasattr(bindings._lib, "gguf_init_from_file"):
        return bindings._lib
    from llama_cpp._ctypes_extensions import load_shared_library

    return load_shared_library("ggml-base", bindings._base_path)


@functools.cache
def _fn(name: str, restype: Any, *argtypes: Any) -> Any:
    """A typed prototype of ``name`` (a new function object: the library's are untouched)."""
    return ctypes.CFUNCTYPE(restype, *argtypes)((name, _ggml()))


# Element dtype of a numeric array, by the same enum (the scalar readers' ctypes types).
ARRAY_DTYPES = {kind: np.dtype(ctype) for kind, (_, ctype) in SCALAR_READERS.items() if kind != 8}
ARRAY = 9


def read_metadata(
    path: Path, prefix: str = "", arrays: Callable[[str], bool] = lambda key: False
) -> dict[str, Any] | None:
    """The scalar metadata values whose keys start with ``prefix``, plus the numeric arrays
    (as lists) whose key ``arrays`` accepts; other arrays are skipped. None when ``path``
    is not a GGUF ggml can parse (missing, not GGUF, truncated header)."""
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    init = _fn("gguf_init_from_file", ptr, ctypes.c_char_p, _InitParams)
    with captured_logs(lambda _level, _text: None):  # a non-GGUF is an answer, not an error
        ctx = init(str(path).encode(), _InitParams(True, None))
    if not ctx:
        return None
    try:
        values: dict[str, Any] = {}
        for index in range(_fn("gguf_get_n_kv", i64, ptr)(ctx)):
            key = _fn("gguf_get_key", ctypes.c_char_p, ptr, i64)(ctx, index).decode()
            kind = _fn("gguf_get_kv_type", ctypes.c_int, ptr, i64)(ctx, index)
            if not key.startswith(prefix):
                continue
            if kind in SCALAR_READERS:
                name, restype = SCALAR_READERS[kind]
                value = _fn(name, restype, ptr, i64)(ctx, index)
                is_text = isinstance(value, bytes)
                values[key] = value.decode("utf-8", "replace") if is_text else value
            elif kind == ARRAY and arrays(key):
                values[key] = _numeric_array(ctx, index)
        return values
    finally:
        _fn("gguf_free", None, ptr)(ctx)


def _numeric_array(ctx: Any, index: int) -> list[Any] | None:
    """A numeric array's values (None for an array of strings or of arrays)."""
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    dtype = ARRAY_DTYPES.get(_fn("gguf_get_arr_type", ctypes.c_int, ptr, i64)(ctx, index))
    if dtype is None:
        return None
    count = _fn("gguf_get_arr_n", ctypes.c_size_t, ptr, i64)(ctx, index)
    data = _fn("gguf_get_arr_data", ptr, ptr, i64)(ctx, index)
    size = count * np.dtype(dtype).itemsize
    return np.frombuffer(ctypes.string_at(data, size), dtype=dtype).tolist() if count else []
