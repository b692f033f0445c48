"""All-position logits of a GGUF model over a token sequence, a batch at a time, with
llama-cpp-python's low-level API (one model and one batch of logits in memory)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from ggufserve.converters.errors import ConversionError
from ggufserve.converters.llama_logs import ErrorLines, captured_logs
from ggufserve.engine.kv_cache import KvCacheType, ggml_type

LOGITS_BATCH_BYTES = 128 * 2**20  # float32 logits of one batch: 128 MiB
MAX_BATCH = 512  # tokens


class QualityError(ConversionError):
    """The quality report could not be measured: llama.cpp could not load a model or
    evaluate the calibration text, the two models disagree (vocabulary), or the quantized
    model's output is not finite."""


class LogitsRunner:
    """A loaded model (``with`` frees it and its context); the context is made by the
    first ``logits`` call, sized for that token sequence, its KV cache holding keys and
    values as ``cache_types`` (f16 by default; ``engine/kv_cache.py``).

    Raises (on entering):
        QualityError: llama.cpp could not load the model.
    """

    def __init__(
        self,
        path: Path,
        n_threads: int | None = None,
        *,
        cache_types: tuple[KvCacheType, KvCacheType] = ("f16", "f16"),
    ):
        self.path = path
        self.cache_types = cache_types
        self.n_threads = n_threads or os.cpu_count() or 1
        self.errors = ErrorLines()
        self._model: Any = None
        self._ctx: Any = None
        self._batch: Any = None
        self.n_vocab = 0
        self.n_batch = 0

    def __enter__(self) -> LogitsRunner:
        import llama_cpp

        with captured_logs(self.errors):
            params = llama_cpp.llama_model_default_params()
            self._model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._model:
            raise QualityError(self._why(f"llama.cpp could not load {self.path.name}"))
        vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(vocab))
        self.n_batch = max(1, min(MAX_BATCH, LOGITS_BATCH_BYTES // (4 * self.n_vocab)))
        return self

    def _start(self, n_ctx: int) -> None:
        import llama_cpp

        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = self.n_batch
        cparams.n_threads = cparams.n_threads_batch = self.n_threads
        cparams.no_perf = True
        cparams.type_k, cparams.type_v = (ggml_type(name) for name in self.cache_types)
        with captured_logs(self.errors):
            self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            raise QualityError(self._why(f"llama.cpp could not start {self.path.name}"))
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        import llama_cpp

        with captured_logs(self.errors):  # freeing logs buffer sizes at INFO level
            if self._batch is not None:
                llama_cpp.llama_batch_free(self._batch)
                self._batch = None
            if self._ctx:
                llama_cpp.llama_free(self._ctx)
                self._ctx = None
            if self._model:
                llama_cpp.llama_model_free(self._model)
                self._model = None

    def tokenize(self, text: str) -> list[int]:
        """The model's tokens for ``text``, with its BOS if it adds one; special-token
        spellings in ``text`` stay plain text."""
        import llama_cpp

        data = text.encode()
        vocab = llama_cpp.llama_model_get_vocab(self._model)
        room = len(data) + 8  # never more tokens than bytes (+ BOS/EOS)
        tokens = (llama_cpp.llama_token * room)()
        count = llama_cpp.llama_tokenize(vocab, data, len(data), tokens, room, True, False)
        if count < 0:
            raise QualityError(f"{self.path.name}: tokenizing the calibration text failed")
        return list(tokens[:count])

    def logits(self, tokens: list[int]) -> Iterator[tuple[int, np.ndarray]]:
        """(first position, float32 logits (n, n_vocab)) per batch, in order. Each array
        is a view of llama.cpp's buffer: use it before asking for the next batch.

        Raises:
            QualityError: ``llama_decode`` failed.
        """
        import llama_cpp

        if self._ctx is None:
            self._start(len(tokens))
        batch = self._batch
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            for i, token in enumerate(chunk):
                batch.token[i] = token
                batch.pos[i] = start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = True  # every position's logits
            batch.n_tokens = len(chunk)
            with captured_logs(self.errors):
                status = llama_cpp.llama_decode(self._ctx, batch)
            if status != 0:
                raise QualityError(self._why(f"llama_decode failed ({status})"))
            rows = llama_cpp.llama_get_logits(self._ctx)
            yield start, np.ctypeslib.as_array(rows, shape=(len(chunk), self.n_vocab))

    def _why(self, message: str) -> str:
        last = self.errors.last()
        return f"{message}: {last}" if last else message
