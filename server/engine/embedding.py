"""Sentence embeddings on an already-loaded llama.cpp model, in a context of their own.

The context is created with ``embeddings=True`` and a pooling layer: the model's own
(``<arch>.pooling_type`` in the GGUF) when it has one, else mean pooling, which generative
GGUFs such as Gemma 3 and Qwen3-VL need as they declare none. Several inputs go into one
``llama_decode``, one sequence id each; the pooled vectors are L2-normalised, as OpenAI's are.
Flash attention is off and every input is padded to whole ``ROW_TILE`` row blocks, so an
input's vector does not depend on what shares its decode (bit-equal on AVX2 CPUs).
"""

from __future__ import annotations

import ctypes
import os
import threading

import llama_cpp
import numpy as np
import numpy.typing as npt
from llama_cpp import _internals

from ggufserve.engine.base import ModelLoadError

DEFAULT_SEQ_MAX = 7  # inputs decoded together in one llama_decode (+1 sequence of pad rows)
# ggml-cpu's repacked quantized GEMM takes token rows in blocks of 16, then 4, then one GEMV
# at a time, each rounding differently (ggml-cpu/arch/x86/repack.cpp, repack.cpp): inputs are
# padded to whole blocks and start on one, so an input embeds alike whatever shares its decode.
ROW_TILE = 16
PAD_TOKEN = 0  # any valid id: pad rows form a sequence of their own, whose output is dropped

# Pooling types whose llama_get_embeddings_seq is a vector of n_embd_out floats.
_VECTOR_POOLING = {
    llama_cpp.LLAMA_POOLING_TYPE_MEAN: "mean",
    llama_cpp.LLAMA_POOLING_TYPE_CLS: "cls",
    llama_cpp.LLAMA_POOLING_TYPE_LAST: "last",
}


def model_pooling(model: _internals.LlamaModel) -> int:
    """The pooling to embed with: the GGUF's ``<arch>.pooling_type`` when it names a vector
    pooling (mean, cls, last), else ``LLAMA_POOLING_TYPE_MEAN`` (none, absent, or rank)."""
    metadata = model.metadata()
    declared = metadata.get(f"{metadata.get('general.architecture', '')}.pooling_type", "")
    try:
        pooling = int(declared)
    except ValueError:
        return llama_cpp.LLAMA_POOLING_TYPE_MEAN
    return pooling if pooling in _VECTOR_POOLING else llama_cpp.LLAMA_POOLING_TYPE_MEAN


class EmbeddingEngine:
    """Embed token sequences with a separate llama.cpp context on a shared model.

    Args:
        model: The loaded model (e.g. the serving engine's); it must outlive this engine.
        n_ctx: KV cells of the context, in tokens, shared by the inputs of one decode.
        n_threads: Threads for the decode (None = all cores).
        n_batch: Logical and physical batch size, in tokens: the most tokens (inputs plus
            pad rows) decoded at once. ``min(n_ctx, n_batch)`` is rounded down to a multiple
            of ``n_seq_max + 1``; the longest input is that rounded down to a multiple of
            ``ROW_TILE``. Generative models compute logits for every row, so llama.cpp
            holds about ``2 * n_vocab * n_batch * 4`` bytes for them (~1 GiB for Gemma 3's
            262k vocabulary at 512; ~260 MiB at 128).
        n_seq_max: Inputs decoded together in one ``llama_decode``.

    Attributes:
        n_embd: Length of each embedding (the model's output width).
        max_tokens: Most tokens one input may have.
        n_seq_max: Inputs decoded together.
        pooling: ``"mean"``, ``"cls"`` or ``"last"``.

    Raises:
        ValueError: ``n_seq_max`` < 1, or ``min(n_ctx, n_batch)`` too small for one decode.
        ModelLoadError: llama.cpp could not create the context, or it ignored the pooling.
    """

    def __init__(
        self,
        model: _internals.LlamaModel,
        *,
        n_ctx: int,
        n_threads: int | None,
        n_batch: int,
        n_seq_max: int = DEFAULT_SEQ_MAX,
    ):
        threads = n_threads or os.cpu_count() or 1
        n_seqs = max(1, n_seq_max) + 1  # the last sequence id holds the pad rows
        # llama.cpp reserves its pooled graph with n_ubatch / n_seq_max tokens per sequence and
        # aborts the process unless that divides exactly.
        n_batch = min(n_ctx, n_batch) // n_seqs * n_seqs
        if n_seq_max < 1 or n_batch < ROW_TILE:
            raise ValueError(
                f"an embedding context needs n_seq_max >= 1 and min(n_ctx, n_batch) >= "
                f"{max(n_seqs, ROW_TILE)}"
            )
        pooling = model_pooling(model)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        # One ubatch per decode: a pooled sequence split over ubatches would be pooled per part.
        params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = n_seqs
        params.kv_unified = True
        params.embeddings = True
        params.pooling_type = pooling
        # CPU flash attention's result moves ~5e-3 with the batch's size; without it, an
        # input embeds the same whatever shares its decode.
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.n_threads = params.n_threads_batch = threads
        try:
            self._ctx = _internals.LlamaContext(model=model, params=params, verbose=False)
        except (ValueError, RuntimeError):
            raise ModelLoadError("llama.cpp could not create the embedding context") from None
        ctx = self._ctx.ctx
        if llama_cpp.llama_pooling_type(ctx) != pooling:
            self._ctx.close()
            raise ModelLoadError("llama.cpp did not apply the embedding pooling type")
        self.pooling = _VECTOR_POOLING[pooling]
        self.n_embd = llama_cpp.llama_model_n_embd_out(model.model)
        self.n_seq_max = llama_cpp.llama_n_seq_max(ctx) - 1
        capacity = min(llama_cpp.llama_n_ctx(ctx), llama_cpp.llama_n_ubatch(ctx))
        self.max_tokens = capacity // ROW_TILE * ROW_TILE
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model.model))
        # Encoder-only models (T5 encoders) have no KV memory and run through llama_encode.
        self._encoder_only = bool(
            llama_cpp.llama_model_has_encoder(model.model)
            and not llama_cpp.llama_model_has_decoder(model.model)
        )
        self._batch = _internals.LlamaBatch(
            n_tokens=self.max_tokens, embd=0, n_seq_max=1, verbose=False
        )
        self._lock = threading.Lock()
        self._closed = False

    def embed(self, batch: list[list[int]]) -> list[npt.NDArray[np.float32]]:
        """Embed each token sequence (blocking; any thread, one call at a time inside).

        Args:
            batch: Token ids per input, BOS included if the model wants one.

        Returns:
            One L2-normalised float32 vector of shape (n_embd,) per input, in order.

        Raises:
            ValueError: an input is empty, holds an id outside the vocabulary, or has more
                than ``max_tokens`` tokens.
            RuntimeError: the engine is closed, or llama.cpp failed to decode.
        """
        for index, tokens in enumerate(batch):
            self._check(index, tokens)
        with self._lock:
            if self._closed:
                raise RuntimeError("the embedding engine is closed")
            vectors: list[npt.NDArray[np.float32]] = []
            for group in self._groups(batch):
                vectors.extend(self._embed_group(group))
        return vectors

    def close(self) -> None:
        """Free the context (the model stays loaded); later ``embed`` calls raise."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._batch.close()
            self._ctx.close()

    def _check(self, index: int, tokens: list[int]) -> None:
        if not tokens:
            raise ValueError(f"input {index} is empty")
        if len(tokens) > self.max_tokens:
            raise ValueError(
                f"input {index} has {len(tokens)} tokens; at most {self.max_tokens} tokens "
                "fit in one embedding"
            )
        if min(tokens) < 0 or max(tokens) >= self._n_vocab:
            raise ValueError(f"input {index} holds a token id outside [0, {self._n_vocab})")

    def _groups(self, batch: list[list[int]]) -> list[list[list[int]]]:
        """Split inputs, in order, into decodes of at most ``n_seq_max`` inputs and
        ``max_tokens`` tokens."""
        groups: list[list[list[int]]] = []
        n_rows = 0
        for tokens in batch:
            if (
                not groups
                or len(groups[-1]) == self.n_seq_max
                or n_rows + _padded(len(tokens)) > self.max_tokens
            ):
                groups.append([])
                n_rows = 0
            groups[-1].append(tokens)
            n_rows += _padded(len(tokens))
        return groups

    def _fill(self, group: list[list[int]]) -> None:
        """Each input at a tile-aligned row, followed by pad rows up to the next tile, as
        it lies when decoded alone; pad rows get consecutive positions in their sequence."""
        batch = self._batch.batch
        row = n_pad = 0
        pad_seq = self.n_seq_max
        for seq_id, tokens in enumerate(group):
            rows = [(token, position, seq_id) for position, token in enumerate(tokens)]
            for _ in range(_padded(len(tokens)) - len(tokens)):
                rows.append((PAD_TOKEN, n_pad, pad_seq))
                n_pad += 1
            for token, position, seq in rows:
                batch.token[row] = token
                batch.pos[row] = position
                batch.n_seq_id[row] = 1
                batch.seq_id[row][0] = seq
                batch.logits[row] = True  # pooling needs every row as an output
                row += 1
        batch.n_tokens = row

    def _embed_group(self, group: list[list[int]]) -> list[npt.NDArray[np.float32]]:
        ctx = self._ctx
        # Positions restart at 0 for every call: drop the previous call's cells first.
        ctx.kv_cache_clear()
        self._fill(group)
        if self._encoder_only:
            ctx.encode(self._batch)
        else:
            ctx.decode(self._batch)
        vectors = []
        for seq_id in range(len(group)):
            pointer = llama_cpp.llama_get_embeddings_seq(ctx.ctx, seq_id)
            if not pointer:
                raise RuntimeError("llama.cpp returned no pooled embedding")
            vector = np.ctypeslib.as_array(
                ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(self.n_embd,)
            ).astype(np.float32)  # copies: the buffer is reused by the next decode
            norm = float(np.linalg.norm(vector))
            vectors.append(vector / norm if norm > 0 else vector)
        return vectors


def _padded(n_tokens: int) -> int:
    """``n_tokens`` rounded up to a multiple of ``ROW_TILE``."""
    return -(-n_tokens // ROW_TILE) * ROW_TILE
