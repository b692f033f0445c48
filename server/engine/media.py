"""Images in prompts through llama.cpp's mtmd: tokenize text + bitmaps into chunks, encode
images (on the engine's encoder thread, cached), decode their rows for one sequence."""

from __future__ import annotations

import ctypes
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
from llama_cpp import mtmd_cpp

from ggufserve.engine.base import EngineStats, ModelLoadError
from ggufserve.engine.sequence import ImageDecodeError, ImagePiece, Piece
from ggufserve.engine.special_tokens import Plan
from ggufserve.generation.image_budget import TokenRange, projector_range
from ggufserve.generation.images import LoadedImage


def _parts(
    plans: list[Plan], bitmaps: list[mtmd_cpp.mtmd_bitmap_p], spelling: Mapping[int, str]
) -> list[tuple[mtmd_cpp.mtmd_input_part, object]]:
    """mtmd input parts: each plan step as text (a token id as its spelling, parsed as a
    special token; text with special-token parsing off), an image between plans. Each
    part is paired with the buffers it points to, which must outlive the call."""
    parts: list[tuple[mtmd_cpp.mtmd_input_part, object]] = []
    for index, plan in enumerate(plans):
        if index:
            parts.append((mtmd_cpp.mtmd_input_part(None, bitmaps[index - 1]), None))
        for step in plan:
            special = isinstance(step, int)
            encoded = (spelling[step] if isinstance(step, int) else step).encode("utf-8")
            text = mtmd_cpp.mtmd_input_text(encoded, len(encoded), False, special)
            parts.append((mtmd_cpp.mtmd_input_part(ctypes.pointer(text), None), (text, encoded)))
    return parts


class EmbeddingCache:
    """LRU of encoded images (float32 embeddings) keyed by image digest, bounded in bytes."""

    def __init__(self, max_bytes: int):
        self._max_bytes = max_bytes
        self._items: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._bytes = 0

    def get(self, key: bytes) -> np.ndarray | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: bytes, value: np.ndarray) -> None:
        if value.nbytes > self._max_bytes or key in self._items:
            return
        self._items[key] = value
        self._bytes += value.nbytes
        while self._bytes > self._max_bytes:
            _, dropped = self._items.popitem(last=False)
            self._bytes -= dropped.nbytes


class MediaPrompt:
    """mtmd's chunks for one prompt (freed with this object).

    Attributes:
        n_tokens: Positions the prompt fills in the context (text tokens + image tokens).
        image_tokens: Each image's tokens, in prompt order.
    """

    def __init__(
        self, chunks: mtmd_cpp.mtmd_input_chunks_p, n_tokens: int, image_tokens: list[int]
    ):
        self.chunks = chunks
        self.n_tokens = n_tokens
        self.image_tokens = image_tokens
        weakref.finalize(self, mtmd_cpp.mtmd_input_chunks_free, chunks)


def read_token_range(
    mmproj: Path, min_tokens: int | None, max_tokens: int | None
) -> TokenRange | None:
    """How the mmproj's projector turns images into tokens under a model's
    ``image_min_tokens`` / ``image_max_tokens`` (its GGUF metadata, read as clip.cpp does).

    Returns:
        The projector's token range, or None where images have a fixed size (Gemma 3).

    Raises:
        ModelLoadError: the file is not a readable GGUF; limits set for a fixed-size
            projector; a minimum above the maximum.
    """
    try:
        fields = gguf.GGUFReader(mmproj).fields
    except (OSError, ValueError, IndexError, KeyError):  # what the reader raises on bad files
        raise ModelLoadError("the vision projector (mmproj) is not a readable GGUF") from None

    def value(key: str, default: object) -> object:
        field = fields.get(key)
        return default if field is None else field.contents()

    projector = value("clip.projector_type", None) or value("clip.vision.projector_type", "")
    patch = value("clip.vision.patch_size", 0)
    merge = value("clip.vision.spatial_merge_size", 2)  # clip.cpp's default for Qwen-VL
    if not isinstance(patch, int) or not isinstance(merge, int):
        raise ModelLoadError("the vision projector (mmproj) has no integer patch size")
    try:
        return projector_range(str(projector), patch, merge, min_tokens, max_tokens)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None


class Mtmd:
    """An mtmd context for one model and its mmproj.

    Raises (on construction):
        ModelLoadError: llama.cpp cannot load the mmproj for this model.
    """

    def __init__(
        self,
        mmproj: Path,
        model: llama_cpp.llama_model_p,
        *,
        n_threads: int,
        use_gpu: bool,
        cache_bytes: int,
        image_min_tokens: int | None = None,
        image_max_tokens: int | None = None,
    ):
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.n_threads = n_threads
        params.print_timings = False
        params.warmup = False
        # -1 (the default) keeps the projector's own limits.
        params.image_min_tokens = image_min_tokens or -1
        params.image_max_tokens = image_max_tokens or -1
        ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj).encode(), model, params)
        if not ctx or not mtmd_cpp.mtmd_support_vision(ctx):
            raise ModelLoadError("llama.cpp could not load the vision projector (mmproj)")
        self._ctx = ctx
        self.marker = mtmd_cpp.mtmd_default_marker().decode()
        self._cache = EmbeddingCache(cache_bytes)
        # Width of an image embedding row: n_embd_inp (Qwen3-VL's deepstack rows are wider).
        self._n_embd = llama_cpp.llama_model_n_embd_inp(model)
        self._finalizer = weakref.finalize(self, mtmd_cpp.mtmd_free, ctx)

    def close(self) -> None:
        self._finalizer()

    def tokenize(
        self, plans: list[Plan], images: list[LoadedImage], spelling: Mapping[int, str]
    ) -> MediaPrompt:
        """Tokenize the prompt's text around its images: ``plans[i]`` is the text before
        image ``i`` (the last one the text after all images), as ``SpecialTokens.plan``
        gives it; ``spelling`` maps a plan's token ids to their text.

        Raises:
            ValueError: plan and image counts differ, or mtmd refused the input.
            UnicodeEncodeError: the text holds lone surrogates.
        """
        if len(plans) != len(images) + 1:
            raise ValueError("the prompt's media markers do not match its images")
        bitmaps = [
            mtmd_cpp.mtmd_bitmap_init(
                image.width,
                image.height,
                (ctypes.c_uint8 * len(image.rgb)).from_buffer_copy(image.rgb),
            )
            for image in images
        ]
        for bitmap, image in zip(bitmaps, images, strict=True):
            # The chunk inherits the id: the embedding cache's key.
            mtmd_cpp.mtmd_bitmap_set_id(bitmap, image.digest.encode())
        chunks = mtmd_cpp.mtmd_input_chunks_init()
        try:
            parts = _parts(plans, bitmaps, spelling)
            array = (ctypes.POINTER(mtmd_cpp.mtmd_input_part) * len(parts))(
                *(ctypes.pointer(part) for part, _ in parts)
            )
            status = mtmd_cpp.mtmd_tokenize_from_parts(self._ctx, chunks, array, len(parts), False)
            if status != 0:
                raise ValueError("mtmd refused the prompt's images")
            counted = [
                (self._is_text(chunk), mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk))
                for chunk in (
                    mtmd_cpp.mtmd_input_chunks_get(chunks, i)
                    for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks))
                )
            ]
        except BaseException:
            mtmd_cpp.mtmd_input_chunks_free(chunks)
            raise
        finally:
            for bitmap in bitmaps:
                mtmd_cpp.mtmd_bitmap_free(bitmap)
        image_tokens = [n for text, n in counted if not text]
        return MediaPrompt(chunks, sum(n for _, n in counted), image_tokens)

    @staticmethod
    def _is_text(chunk: mtmd_cpp.mtmd_input_chunk_p) -> bool:
        return mtmd_cpp.mtmd_input_chunk_get_type(chunk) == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_TEXT

    @staticmethod
    def text_tokens(chunk: mtmd_cpp.mtmd_input_chunk_p) -> list[int]:
        count = ctypes.c_size_t(0)
        tokens = mtmd_cpp.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
        return [int(tokens[i]) for i in range(count.value)]

    def pieces(
        self,
        prompt: MediaPrompt,
        encode: Callable[[mtmd_cpp.mtmd_input_chunk_p], Future[np.ndarray]],
    ) -> list[Piece]:
        """The prompt as token lists and images, in order; ``encode`` starts each image's
        encoding (off the owner thread) and returns its future embedding."""
        out: list[Piece] = []
        for index in range(mtmd_cpp.mtmd_input_chunks_size(prompt.chunks)):
            chunk = mtmd_cpp.mtmd_input_chunks_get(prompt.chunks, index)
            if self._is_text(chunk):
                if tokens := self.text_tokens(chunk):
                    out.append(tokens)
            else:
                n_tokens = mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)
                out.append(ImagePiece(chunk, n_tokens, encode(chunk)))
        return out

    def decode(
        self,
        piece: ImagePiece,
        lctx: llama_cpp.llama_context_p,
        seq_id: int,
        n_past: int,
        n_batch: int,
    ) -> int:
        """Decode an encoded image's rows for one sequence from position ``n_past``
        (owner thread). mtmd's helper turns causal attention off for Gemma 3's
        non-causal image rows and gives Qwen3-VL's rows their M-RoPE positions.

        Returns:
            The next position (after Qwen3-VL images it advances by ``n_pos``, not rows).

        Raises:
            ImageDecodeError: llama.cpp failed to decode the rows.
            RuntimeError: the image's encoding error.
        """
        embedding = piece.embedding.result()
        new_n_past = llama_cpp.llama_pos(0)
        status = mtmd_cpp.mtmd_helper_decode_image_chunk(
            self._ctx,
            lctx,
            piece.chunk,
            embedding.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
            n_past,
            seq_id,
            n_batch,
            ctypes.byref(new_n_past),
            mtmd_cpp.mtmd_helper_post_decode_callback(),  # NULL: no callback
            None,
        )
        if status != 0:
            raise ImageDecodeError(status)
        return int(new_n_past.value)

    def encode(self, chunk: mtmd_cpp.mtmd_input_chunk_p, stats: EngineStats) -> np.ndarray:
        """The image's embeddings (n_tokens × n_embd_inp float32), from the cache or encoded.
        Call from one thread only (the engine's encoder): mtmd's output buffer and the
        cache are not shared.

        Raises:
            RuntimeError: mtmd failed to encode the image.
        """
        key = mtmd_cpp.mtmd_input_chunk_get_id(chunk) or b""
        cached = self._cache.get(key) if key else None
        if cached is not None:
            stats.image_cache_hits += 1
            return cached
        status = mtmd_cpp.mtmd_encode_chunk(self._ctx, chunk)
        if status != 0:
            raise RuntimeError(f"mtmd could not encode an image ({status})")
        n_tokens = mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)
        output = mtmd_cpp.mtmd_get_output_embd(self._ctx)
        embedding = np.ctypeslib.as_array(output, shape=(n_tokens * self._n_embd,)).copy()
        stats.image_encodes += 1
        if key:
            self._cache.put(key, embedding)
        return embedding
