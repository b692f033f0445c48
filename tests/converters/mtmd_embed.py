"""llama.cpp's mtmd for a (text GGUF, mmproj GGUF) pair, as the parity tests use it: image
embeddings (tokenize one media marker with one bitmap, encode the image chunk, read the
output), the logits of the text rows that follow an image, and an image chat through
llama-cpp-python's own multimodal chat handler."""

from __future__ import annotations

import base64
import ctypes
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import mtmd_cpp


def _context(llama: llama_cpp.Llama, mmproj: Path) -> mtmd_cpp.mtmd_context_p:
    params = mtmd_cpp.mtmd_context_params_default()
    params.use_gpu = False
    params.print_timings = False
    params.warmup = False
    params.n_threads = 2
    ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj).encode(), llama._model.model, params)
    assert ctx, "mtmd could not load the mmproj"
    return ctx


def _bitmap(image: np.ndarray) -> mtmd_cpp.mtmd_bitmap_p:
    height, width, _ = image.shape
    raw = np.ascontiguousarray(image, dtype=np.uint8).tobytes()
    return mtmd_cpp.mtmd_bitmap_init(
        width, height, (ctypes.c_uint8 * len(raw)).from_buffer_copy(raw)
    )


def _tokenize(
    ctx: mtmd_cpp.mtmd_context_p, prompt: bytes, bitmap: mtmd_cpp.mtmd_bitmap_p
) -> mtmd_cpp.mtmd_input_chunks_p:
    """Chunks of ``prompt`` (one media marker) with ``bitmap``; free with
    ``mtmd_input_chunks_free``."""
    chunks = mtmd_cpp.mtmd_input_chunks_init()
    text = mtmd_cpp.mtmd_input_text(prompt, len(prompt), True, True)
    bitmaps = (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bitmap)
    if mtmd_cpp.mtmd_tokenize(ctx, chunks, ctypes.byref(text), bitmaps, 1) != 0:
        mtmd_cpp.mtmd_input_chunks_free(chunks)
        raise AssertionError("mtmd could not tokenize the prompt")
    return chunks


@dataclass
class ImagePrompt:
    """What llama.cpp ran: the text token ids around the image, the image's token count
    and grid (``nx`` × ``ny`` merged patches), and the logits of every row after it."""

    before: list[int]
    n_image_tokens: int
    nx: int
    ny: int
    after: list[int]
    logits_after: np.ndarray  # (len(after), n_vocab)


def logits_after_image(
    llama: llama_cpp.Llama, mmproj: Path, prompt: str, image: np.ndarray
) -> ImagePrompt:
    """Run ``prompt`` (one media marker) with ``image`` through mtmd: the text before and
    the image via mtmd's helper (which assigns M-RoPE positions), then the text after as
    one batch with logits on, starting at the position the helper returned.

    ``llama`` must have been created with ``n_ctx`` ≥ the prompt's positions."""
    ctx = _context(llama, mmproj)
    bitmap = _bitmap(image)
    chunks = _tokenize(ctx, prompt.encode(), bitmap)
    try:
        n_chunks = mtmd_cpp.mtmd_input_chunks_size(chunks)
        kinds = [
            mtmd_cpp.mtmd_input_chunk_get_type(mtmd_cpp.mtmd_input_chunks_get(chunks, i))
            for i in range(n_chunks)
        ]
        assert kinds == [
            mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_TEXT,
            mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_IMAGE,
            mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_TEXT,
        ], kinds
        before, image_chunk, after_chunk = (
            mtmd_cpp.mtmd_input_chunks_get(chunks, i) for i in range(3)
        )
        n_past = 0
        for chunk in (before, image_chunk):
            new_n_past = llama_cpp.llama_pos(0)
            assert (
                mtmd_cpp.mtmd_helper_eval_chunk_single(
                    ctx,
                    llama.ctx,
                    chunk,
                    n_past,
                    0,
                    llama.n_batch,
                    False,
                    ctypes.byref(new_n_past),
                )
                == 0
            )
            n_past = new_n_past.value
        image_tokens = mtmd_cpp.mtmd_input_chunk_get_tokens_image(image_chunk)
        after = _text_tokens(after_chunk)
        llama._batch.set_batch(after, n_past=n_past, logits_all=True)
        llama._ctx.decode(llama._batch)
        n_vocab = llama.n_vocab()
        rows = [
            np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llama.ctx, i), shape=(n_vocab,))
            for i in range(len(after))
        ]
        return ImagePrompt(
            before=_text_tokens(before),
            n_image_tokens=mtmd_cpp.mtmd_input_chunk_get_n_tokens(image_chunk),
            nx=mtmd_cpp.mtmd_image_tokens_get_nx(image_tokens),
            ny=mtmd_cpp.mtmd_image_tokens_get_ny(image_tokens),
            after=after,
            logits_after=np.array(rows, dtype=np.float32),
        )
    finally:
        mtmd_cpp.mtmd_input_chunks_free(chunks)
        mtmd_cpp.mtmd_bitmap_free(bitmap)
        mtmd_cpp.mtmd_free(ctx)


def _text_tokens(chunk: mtmd_cpp.mtmd_input_chunk_p) -> list[int]:
    n_tokens = ctypes.c_size_t(0)
    data = mtmd_cpp.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n_tokens))
    return [int(data[i]) for i in range(n_tokens.value)]


def image_embeddings(
    llama: llama_cpp.Llama, mmproj: Path, images: list[np.ndarray]
) -> list[np.ndarray]:
    """One (n_image_tokens, n_embd_inp) float32 array per RGB uint8 image (H, W, 3);
    ``n_embd_inp`` is the text model's input width: n_embd, times (1 + deepstack layers)
    for Qwen3-VL (main features first, then each deepstack layer's)."""
    ctx = _context(llama, mmproj)
    n_embd = llama_cpp.llama_model_n_embd_inp(llama._model.model)
    try:
        return [_encode(ctx, image, n_embd) for image in images]
    finally:
        mtmd_cpp.mtmd_free(ctx)


def _encode(ctx: mtmd_cpp.mtmd_context_p, image: np.ndarray, n_embd: int) -> np.ndarray:
    bitmap = _bitmap(image)
    chunks = _tokenize(ctx, mtmd_cpp.mtmd_default_marker(), bitmap)
    try:
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


def chat_with_image(text_gguf: Path, mmproj: Path, size: tuple[int, int]) -> dict[str, Any]:
    """One image chat completion (a flat-colour PNG of ``size`` (width, height) as a data
    URI, 4 tokens, greedy) through llama-cpp-python's ``MTMDChatHandler``."""
    from llama_cpp.llama_chat_format import MTMDChatHandler
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    handler = MTMDChatHandler(clip_model_path=str(mmproj), verbose=False, use_gpu=False)
    llama = llama_cpp.Llama(str(text_gguf), n_ctx=512, chat_handler=handler, verbose=False)
    content = [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "What is in the image?"},
    ]
    try:
        reply = llama.create_chat_completion(
            messages=[{"role": "user", "content": content}],  # type: ignore[list-item]
            max_tokens=4,
            temperature=0,
        )
    finally:
        llama.close()
    return reply  # type: ignore[return-value]
