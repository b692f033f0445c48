"""The llama.cpp engine: one ``llama_cpp.Llama`` per model, driven token by token on its
worker thread, with prefix reuse of the KV cache between requests."""

from __future__ import annotations

import asyncio
import ctypes
import os
from pathlib import Path

import llama_cpp
from llama_cpp import _internals

from server.engine.base import (
    EngineStats,
    Finished,
    FinishReason,
    GenerationRequest,
    ModelInfo,
    ModelLoadError,
    SamplingParams,
    TextDelta,
)
from server.engine.media import MediaPrompt, Mtmd
from server.engine.text import StopScanner
from server.engine.worker import Generation, Worker
from server.images import LoadedImage

# llama.cpp's server default for the penalty window (common/common.h, penalty_last_n).
PENALTY_LAST_N = 64


class LlamaEngine:
    """Serve one GGUF model with llama.cpp.

    Args:
        model_path: The GGUF file.
        n_ctx: Context size in tokens.
        n_gpu_layers: Layers to offload (-1 = all; ignored by CPU builds).
        n_threads: Threads for generation and prompt processing (None = all cores).
        n_batch: Logical and physical batch size for prompt processing, in tokens (at
            least one image's tokens: Gemma 3 image chunks are decoded in one batch).
        max_queued: Requests allowed to wait behind the running one.
        mmproj_path: The vision projector GGUF, or None for a text-only model.
        image_cache_bytes: Bound of the LRU of encoded images, in bytes (0 disables it).

    Raises:
        ModelLoadError: llama.cpp failed to load the file.
    """

    def __init__(
        self,
        model_path: Path,
        *,
        n_ctx: int,
        n_gpu_layers: int,
        n_threads: int | None,
        n_batch: int,
        max_queued: int,
        mmproj_path: Path | None = None,
        image_cache_bytes: int = 0,
    ):
        threads = n_threads or os.cpu_count() or 1
        try:
            self._llama = llama_cpp.Llama(
                model_path=str(model_path),
                n_ctx=n_ctx,
                n_gpu_layers=n_gpu_layers,
                n_threads=threads,
                n_threads_batch=threads,
                n_batch=n_batch,
                n_ubatch=n_batch,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError):
            raise ModelLoadError("llama.cpp could not load the model file") from None
        self._vocab = self._llama._model.vocab
        self._n_swa = llama_cpp.llama_model_n_swa(self._llama._model.model)
        self._pieces: dict[int, bytes] = {}
        self._mtmd = (
            Mtmd(
                mmproj_path,
                self._llama,
                n_threads=threads,
                use_gpu=n_gpu_layers != 0,
                cache_bytes=image_cache_bytes,
            )
            if mmproj_path is not None
            else None
        )
        self.info = self._read_info()
        self.stats = EngineStats()
        self._worker = Worker(self._run, max_queued=max_queued, name=f"llama:{model_path.name}")

    def _read_info(self) -> ModelInfo:
        llama = self._llama
        bos = llama.token_bos()
        return ModelInfo(
            architecture=llama.metadata.get("general.architecture", ""),
            n_ctx=llama.n_ctx(),
            n_vocab=llama.n_vocab(),
            bos_token=self._token_text(bos),
            eos_token=self._token_text(llama.token_eos()),
            bos_token_id=bos,
            add_bos=bool(llama_cpp.llama_vocab_get_add_bos(self._vocab)),
            chat_template=llama.metadata.get("tokenizer.chat_template"),
            vision=self._mtmd is not None,
        )

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return llama_cpp.llama_vocab_get_text(self._vocab, token).decode("utf-8", "replace")

    # ---- called from any thread -----------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """Tokenize with special tokens parsed and no BOS added (the template adds it).

        Raises:
            UnicodeEncodeError: ``text`` holds lone surrogates.
        """
        return self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    @property
    def media_marker(self) -> str:
        """The text that stands for one image in a prompt (mtmd's marker)."""
        assert self._mtmd is not None
        return self._mtmd.marker

    def tokenize_media(self, prompt: str, images: list[LoadedImage]) -> MediaPrompt:
        """Tokenize a prompt holding one media marker per image (any thread).

        Raises:
            ValueError: the markers and images do not match.
        """
        assert self._mtmd is not None
        return self._mtmd.tokenize(prompt, images)

    def submit(self, request: GenerationRequest) -> Generation:
        """Queue a generation; iterate ``Generation.events()`` on the calling event loop.

        Raises:
            EngineBusy: the queue is full.
            EngineClosed: the engine is shutting down.
        """
        generation = Generation(request, asyncio.get_running_loop())
        self._worker.submit(generation)
        return generation

    def queue_depth(self) -> int:
        return self._worker.depth()

    def close(self) -> None:
        self._worker.close()
        if self._mtmd is not None:
            self._mtmd.close()
        self._llama.close()

    # ---- worker thread only ---------------------------------------------------------

    def _run(self, job: Generation) -> None:
        request = job.request
        llama = self._llama
        prompt = request.prompt_tokens
        if request.media is not None:
            assert self._mtmd is not None
            self._mtmd.evaluate(request.media, llama, self.stats)
            n_prompt, pending = request.media.n_tokens, []
        else:
            reused = self._reuse_prefix(prompt)
            n_prompt, pending = len(prompt), prompt[reused:]
            self.stats.prompt_tokens_reused += reused
        self.stats.prompt_tokens += n_prompt
        scanner = StopScanner(request.stop)
        sampler = self._sampler(request.sampling)
        completion_tokens = 0
        finish_reason: FinishReason = "length"
        stopped = False
        try:
            while completion_tokens < request.max_tokens:
                if job.cancelled:
                    self.stats.requests_cancelled += 1
                    return
                llama.eval(pending)
                token = sampler.sample(llama._ctx, -1)
                if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                    finish_reason = "stop"
                    break
                completion_tokens += 1
                self.stats.generated_tokens += 1
                text, stopped = scanner.feed(self._piece(token))
                if text:
                    job.emit(TextDelta(text))
                if stopped:
                    finish_reason = "stop"
                    break
                pending = [token]
        finally:
            sampler.close()
        # Text held back as a possible stop-string start is released if no stop followed.
        tail = "" if stopped else scanner.flush()
        if tail:
            job.emit(TextDelta(tail))
        self.stats.requests_finished += 1
        job.emit(Finished(finish_reason, n_prompt, completion_tokens))

    def _reuse_prefix(self, prompt: list[int]) -> int:
        """Keep the longest cached prefix of ``prompt`` in the KV cache; return its length.

        At least the last prompt token is always decoded again, for fresh logits. With
        sliding-window attention the cache may no longer hold the window before the cut
        (llama.cpp server.cpp's `pos_min` check); then everything is decoded again.
        """
        llama = self._llama
        cached = llama.input_ids[: llama.n_tokens]
        n_common = 0
        for a, b in zip(cached, prompt, strict=False):
            if a != b:
                break
            n_common += 1
        keep = min(n_common, len(prompt) - 1)
        if keep > 0 and not llama._ctx.kv_cache_seq_rm(0, keep, -1):
            keep = 0
        if keep > 0 and self._n_swa > 0:
            memory = llama_cpp.llama_get_memory(llama._ctx.ctx)
            pos_min = llama_cpp.llama_memory_seq_pos_min(memory, 0)
            if pos_min > max(0, keep - self._n_swa):
                keep = 0
        llama.n_tokens = keep
        return keep

    def _sampler(self, params: SamplingParams) -> _internals.LlamaSampler:
        """llama.cpp sampler chain: bias, penalties, then greedy or top-k/top-p/min-p/temp/dist."""
        n_vocab = self.info.n_vocab
        sampler = _internals.LlamaSampler()
        if params.logit_bias:
            sampler.add_logit_bias(n_vocab, params.logit_bias)
        if (params.repeat_penalty, params.frequency_penalty, params.presence_penalty) != (
            1.0,
            0.0,
            0.0,
        ):
            sampler.add_penalties(
                n_vocab,
                PENALTY_LAST_N,
                params.repeat_penalty,
                params.frequency_penalty,
                params.presence_penalty,
            )
        if params.temperature == 0.0:
            sampler.add_greedy()
            return sampler
        if params.top_k > 0:
            sampler.add_top_k(params.top_k)
        sampler.add_top_p(params.top_p, 1)
        sampler.add_min_p(params.min_p, 1)
        sampler.add_temp(params.temperature)
        sampler.add_dist(params.seed)
        return sampler

    def _piece(self, token: int) -> bytes:
        """The bytes of one token, special tokens rendered as nothing (cached per id)."""
        piece = self._pieces.get(token)
        if piece is None:
            size = 64
            while True:
                buffer = ctypes.create_string_buffer(size)
                n = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, size, 0, False)
                if n >= 0:
                    break
                size = -n  # a negative result is the size needed
            piece = buffer.raw[:n]
            self._pieces[token] = piece
        return piece
