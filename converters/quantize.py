"""Quantize a GGUF with llama.cpp's own quantizer (``llama_model_quantize``), atomically."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from converters.errors import QuantizationError
from converters.writer import atomic_path, check_output

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


def quantize(
    source: Path, target: Path, quant_type: str, *, force: bool, n_threads: int | None = None
) -> Path:
    """Write ``target``, a ``quant_type`` quantization of ``source`` (an F32/F16/BF16 GGUF).

    Raises:
        QuantizationError: unknown type, or llama.cpp's quantizer returned non-zero
            (the partial output is removed).
        OutputExistsError: ``target`` exists and not ``force``.
    """
    import llama_cpp  # the quantizer lives in llama.cpp itself

    ftype_name = QUANT_TYPES.get(quant_type.upper())
    if ftype_name is None:
        known = ", ".join(QUANT_TYPES)
        raise QuantizationError(f"unknown quantization type '{quant_type}' (known: {known})")
    check_output(target, force)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype_name)
    params.nthread = n_threads or os.cpu_count() or 1
    with atomic_path(target) as tmp:
        status = llama_cpp.llama_model_quantize(
            str(source).encode(), str(tmp).encode(), ctypes.byref(params)
        )
        if status != 0 or not tmp.is_file():
            raise QuantizationError(f"llama.cpp could not quantize {source.name} to {quant_type}")
    return target
