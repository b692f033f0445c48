"""Image embeddings computed by llama.cpp's mtmd for a (text GGUF, mmproj GGUF) pair:
tokenize one media marker with one bitmap, encode the image chunk, read the output."""

from __future__ import annotations

import ctypes
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp import mtmd_cpp


def image_embeddings(
    llama: llama_cpp.Llama, mmproj: Path, images: list[np.ndarray]
) -> list[np.ndarray]:
    """One (n_image_tokens, n_embd_text) float32 array per RGB uint8 image (H, W, 3)."""
    params = mtmd_cpp.mtmd_context_params_default()
    params.use_gpu = False
    params.print_timings = False
    params.warmup = False
    params.n_threads = 2
    ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj).encode(), llama._model.model, params)
    assert ctx, "mtmd could not load the mmproj"
    n_embd = llama.n_embd()
    try:
        return [_encode(ctx, image, n_embd) for image in images]
    finally:
        mtmd_cpp.mtmd_free(ctx)


def _encode(ctx: mtmd_cpp.mtmd_context_p, image: np.ndarray, n_embd: int) -> np.ndarray:
    height, width, _ = image.shape
    raw = np.ascontiguousarray(image, dtype=np.uint8).tobytes()
    bitmap = mtmd_cpp.mtmd_bitmap_init(
        width, height, (ctypes.c_uint8 * len(raw)).from_buffer_copy(raw)
    )
    chunks = mtmd_cpp.mtmd_input_chunks_init()
    try:
        marker = mtmd_cpp.mtmd_default_marker()
        text = mtmd_cpp.mtmd_input_text(marker, len(marker), False, True)
        bitmaps = (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bitmap)
        assert mtmd_cpp.mtmd_tokenize(ctx, chunks, ctypes.byref(text), bitmaps, 1) == 0
        for index in range(mtmd_cpp.mtmd_input_chunks_size(chunks)):
            chunk = mtmd_cpp.mtmd_input_chunks_get(chunks, index)
            if mtmd_cpp.mtmd_input_chunk_get_type(chunk) != mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                continue
            assert mtmd_cpp.mtmd_encode_chunk(ctx, chunk) == 0
            n_tokens = mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)
            out = mtmd_cpp.mtmd_get_output_embd(ctx)
            return (
                np.ctypeslib.as_array(out, shape=(n_tokens * n_embd,))
                .reshape(n_tokens, n_embd)
                .copy()
            )
        raise AssertionError("no image chunk")
    finally:
        mtmd_cpp.mtmd_input_chunks_free(chunks)
        mtmd_cpp.mtmd_bitmap_free(bitmap)
