"""The llama.cpp engine: one model, one context serving up to ``n_parallel`` sequences with
continuous batching (see ``scheduler``), and an encoder thread for images."""

from __future__ import annotations

import asyncio
import ctypes
import os
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import llama_cpp
from llama_cpp import _internals
from llama_cpp._logger import set_verbose

from ggufserve.engine.base import (
    EngineStats,
    GenerationRequest,
    GrammarSpec,
    ModelInfo,
    ModelLoadError,
)
from ggufserve.engine.draft_model import DraftModel
from ggufserve.engine.kv_cache import FlashAttn, KvCacheType, ggml_type, is_quantized
from ggufserve.engine.media import MediaPrompt, Mtmd, read_token_range
from ggufserve.engine.native_load import load_model, new_context
from ggufserve.engine.sampling import CompiledGrammar, TokenSampler, compile_grammar
from ggufserve.engine.scheduler import ContextLimits, Scheduler
from ggufserve.engine.sequence import ImagePiece, Piece, Running
from ggufserve.engine.special_tokens import SPECIAL, Plan, SpecialTokens
from ggufserve.engine.speculative import PROMPT_LOOKUP, SpecConfig
from ggufserve.engine.text import StopScanner
from ggufserve.engine.worker import Generation, StepClock
from ggufserve.generation.image_budget import TokenRange
from ggufserve.generation.images import LoadedImage

# Image-boundary spellings some vocabularies mark USER_DEFINED (Gemma 3): markup all the
# same, since only a template (or mtmd) may place an image.
MEDIA_SPELLINGS = frozenset(
    {"<start_of_image>", "<end_of_image>", "<|vision_start|>", "<|vision_end|>"}
)
# Output rows per step for scoring prompts (``/v1/completions`` echo + logprobs): each is a
# logits row of n_vocab floats (1 MiB for Gemma 3's 262k vocabulary).
PROMPT_LOGPROB_ROWS = 32
FLASH_ATTN_TYPES = {
    "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}


class LlamaEngine:
    """Serve one GGUF model with llama.cpp.

    Args:
        model_path: The GGUF file.
        n_ctx: Context size in tokens, shared by all sequences (unified KV cache).
        n_parallel: Sequences decoded together (requests served at once).
        n_gpu_layers: Layers to offload (-1 = all; ignored by CPU builds).
        n_threads: Threads for generation and prompt processing (None = all cores).
        n_batch: Logical and physical batch size, in tokens (at least one image's tokens:
            Gemma 3 image rows are non-causal and must sit in one ubatch).
        swa_full: Keep the whole context in sliding-window layers (Gemma 3), so a cached
            prefix can always be reused; costs KV memory (docs/engine-and-performance.md).
        cache_type_k / cache_type_v: Element types of the KV cache's keys / values
            (``engine/kv_cache.py``: f16, q8_0, q4_0, ...).
        flash_attn: ``auto`` (llama.cpp's choice; forced on by a quantized V cache),
            ``on`` or ``off``.
        max_queued: Requests allowed to wait for a free sequence.
        mmproj_path: The vision projector GGUF, or None for a text-only model.
        image_cache_bytes: Bound of the LRU of encoded images, in bytes (0 disables it).
        image_min_tokens / image_max_tokens: mtmd's range of tokens per image (None: the
            projector's own; only Qwen-VL projectors take them).
        load_progress: Called with the fraction (0..1) of the weights loaded, as llama.cpp
            reports it (``llama_model_params.progress_callback``), on the loading thread.
        speculation: Speculative decoding settings (default: prompt lookup), or None for
            none; a request may still turn it off (``GenerationRequest.speculative``).
            With ``speculation.draft`` a draft model (``engine/draft_model.py``) is loaded
            beside this one, with a context of ``n_ctx`` f16 cells.

    Attributes:
        image_range: How the projector sizes images in tokens under these limits (None:
            no mmproj, or a fixed-size projector such as Gemma 3's).

    Raises:
        ModelLoadError: llama.cpp failed to load the file or create the context (e.g. a
            quantized cache type whose block does not divide the model's head size); a
            quantized ``cache_type_v`` with ``flash_attn`` off; image token limits for a
            projector that ignores them, or a minimum above the maximum; a draft model
            that does not load or whose vocabulary differs from this model's.
    """

    def __init__(
        self,
        model_path: Path,
        *,
        n_ctx: int,
        n_parallel: int = 4,
        n_gpu_layers: int,
        n_threads: int | None,
        n_batch: int,
        swa_full: bool = True,
        cache_type_k: KvCacheType = "f16",
        cache_type_v: KvCacheType = "f16",
        flash_attn: FlashAttn = "auto",
        max_queued: int,
        mmproj_path: Path | None = None,
        image_cache_bytes: int = 0,
        image_min_tokens: int | None = None,
        image_max_tokens: int | None = None,
        load_progress: Callable[[float], None] | None = None,
        speculation: SpecConfig | None = PROMPT_LOOKUP,
    ):
        threads = n_threads or os.cpu_count() or 1
        if flash_attn == "off" and is_quantized(cache_type_v):
            raise ModelLoadError(
                f"cache_type_v {cache_type_v} is quantized, which needs flash attention "
                "(flash_attn auto or on)"
            )
        # Read before the weights load, so that limits a projector ignores fail fast.
        self.image_range: TokenRange | None = (
            read_token_range(mmproj_path, image_min_tokens, image_max_tokens)
            if mmproj_path is not None
            else None
        )
        self.n_parallel = n_parallel
        set_verbose(False)  # llama.cpp's own log lines stay out of the server log
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = n_gpu_layers
        if load_progress is not None:
            # Kept on the instance: llama.cpp calls it while the model loads.
            self._on_progress = llama_cpp.llama_progress_callback(
                lambda fraction, _: load_progress(fraction) or True
            )
            model_params.progress_callback = self._on_progress
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = n_ctx
        ctx_params.n_batch = ctx_params.n_ubatch = n_batch
        ctx_params.n_seq_max = n_parallel
        # The logits buffer need not hold n_batch rows: one per sequence per step, one per
        # prompt ending in the step, and a window of rows for prompt logprobs.
        n_outputs_max = 2 * n_parallel + PROMPT_LOGPROB_ROWS
        ctx_params.n_outputs_max = n_outputs_max
        ctx_params.kv_unified = True
        ctx_params.swa_full = swa_full
        ctx_params.type_k = ggml_type(cache_type_k)
        ctx_params.type_v = ggml_type(cache_type_v)
        ctx_params.flash_attn_type = FLASH_ATTN_TYPES[flash_attn]
        ctx_params.n_threads = ctx_params.n_threads_batch = threads
        self._model = load_model(
            model_path, model_params, "llama.cpp could not load the model file"
        )
        self._ctx = new_context(
            self._model,
            ctx_params,
            f"llama.cpp could not create a context of {n_ctx} tokens (cache_type_k "
            f"{cache_type_k}, cache_type_v {cache_type_v}, flash_attn {flash_attn})",
        )
        self._draft = self._load_draft(
            speculation, model_path.name, n_ctx, n_parallel, n_batch, threads, n_gpu_layers
        )
        self._vocab = llama_cpp.llama_model_get_vocab(self._model.model)
        self._pieces: dict[tuple[int, bool], bytes] = {}
        self.special_tokens, max_token_chars = self._read_vocab()
        self._mtmd = (
            Mtmd(
                mmproj_path,
                self._model.model,
                n_threads=threads,
                use_gpu=n_gpu_layers != 0,
                cache_bytes=image_cache_bytes,
                image_min_tokens=image_min_tokens,
                image_max_tokens=image_max_tokens,
            )
            if mmproj_path is not None
            else None
        )
        self._encoder = ThreadPoolExecutor(1, thread_name_prefix=f"mtmd:{model_path.name}")
        self.info = self._read_info(max_token_chars)
        self.stats = EngineStats()
        self._scheduler = Scheduler(
            self._ctx,
            ContextLimits(
                n_parallel=n_parallel,
                n_batch=n_batch,
                prefill_chunk=max(32, n_batch // 4),
                n_swa=llama_cpp.llama_model_n_swa(self._model.model),
                swa_full=swa_full,
                n_outputs_max=n_outputs_max,
                n_vocab=self.info.n_vocab,
            ),
            start=self._start,
            piece=self._piece,
            shown_piece=self._shown_piece,
            is_eog=lambda token: bool(llama_cpp.llama_vocab_is_eog(self._vocab, token)),
            decode_image=self._decode_image,
            stats=self.stats,
            max_queued=max_queued,
            name=f"llama:{model_path.name}",
            speculation=speculation,
            draft_model=self._draft,
        )

    def _load_draft(
        self,
        speculation: SpecConfig | None,
        name: str,
        n_ctx: int,
        n_parallel: int,
        n_batch: int,
        threads: int,
        n_gpu_layers: int,
    ) -> DraftModel | None:
        """The draft model of ``speculation``, if any (frees this model when it fails)."""
        if speculation is None or speculation.draft is None:
            return None
        try:
            return DraftModel(
                speculation.draft,
                target=self._model,
                target_name=name,
                n_ctx=n_ctx,
                n_parallel=n_parallel,
                n_batch=n_batch,
                n_threads=threads,
                n_gpu_layers=n_gpu_layers,
                n_max=speculation.n_max,
                p_min=speculation.p_min,
            )
        except ModelLoadError:
            self._ctx.close()
            self._model.close()
            raise

    def _read_vocab(self) -> tuple[SpecialTokens, int]:
        """The special tokens, and the longest token text in characters (one pass)."""
        vocab = self._vocab
        specials: list[tuple[int, str, int]] = []
        longest = 1
        for token in range(llama_cpp.llama_vocab_n_tokens(vocab)):
            attr = llama_cpp.llama_vocab_get_attr(vocab, token)
            if attr & llama_cpp.LLAMA_TOKEN_ATTR_BYTE:
                continue  # one byte of text, whatever its spelling
            text = self._token_text(token)
            longest = max(longest, len(text))
            if attr & SPECIAL:
                specials.append((token, text, attr))
        named = [
            llama_cpp.llama_vocab_bos(vocab),
            llama_cpp.llama_vocab_eos(vocab),
            llama_cpp.llama_vocab_eot(vocab),
            llama_cpp.llama_vocab_sep(vocab),
            llama_cpp.llama_vocab_pad(vocab),
        ]
        media = [token for token, text, _ in specials if text in MEDIA_SPELLINGS]
        markup = [token for token in named if token >= 0] + media
        return SpecialTokens(specials, markup), longest

    def _read_info(self, max_token_chars: int) -> ModelInfo:
        metadata = self._model.metadata()
        bos = llama_cpp.llama_vocab_bos(self._vocab)
        return ModelInfo(
            max_token_chars=max_token_chars,
            architecture=metadata.get("general.architecture", ""),
            n_ctx=self._ctx.n_ctx(),
            n_vocab=llama_cpp.llama_vocab_n_tokens(self._vocab),
            bos_token=self._token_text(bos),
            eos_token=self._token_text(llama_cpp.llama_vocab_eos(self._vocab)),
            bos_token_id=bos,
            add_bos=bool(llama_cpp.llama_vocab_get_add_bos(self._vocab)),
            chat_template=metadata.get("tokenizer.chat_template"),
            vision=self._mtmd is not None,
        )

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return llama_cpp.llama_vocab_get_text(self._vocab, token).decode("utf-8", "replace")

    # ---- called from any thread -----------------------------------------------------

    def tokenize(self, text: str, restore: Mapping[str, str] | None = None) -> list[int]:
        """Tokenize with special tokens parsed and no BOS added (the template adds it):
        llama.cpp's ids, in time linear in the text (see ``special_tokens``).

        ``restore`` maps placeholders of markup spellings (a rendered request, see
        ``SpecialTokens.plan``) to their spellings, which become plain text.

        Raises:
            UnicodeEncodeError: ``text`` holds lone surrogates.
        """
        return self.run_plan(self.special_tokens.plan(text, restore))

    def run_plan(self, plan: Plan) -> list[int]:
        """The token ids of a plan: its ids, and its text tokenized with special-token
        parsing off (any thread).

        Raises:
            UnicodeEncodeError: the text holds lone surrogates.
        """
        return [token for _, ids in self._steps(plan) for token in ids]

    def _steps(self, plan: Plan) -> Iterator[tuple[int | str, list[int]]]:
        """Each step of a plan with its ids; text whose merges rebuild a markup token
        becomes one step per character."""
        markup = self.special_tokens.markup_ids
        for step in plan:
            if isinstance(step, int):
                yield step, [step]
                continue
            ids = self._plain(step)
            if markup.isdisjoint(ids):
                yield step, ids
            else:
                yield from ((char, self._plain(char)) for char in step)

    def _plain(self, text: str) -> list[int]:
        return self._model.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    @property
    def media_marker(self) -> str:
        """The text that stands for one image in a prompt (mtmd's marker)."""
        assert self._mtmd is not None
        return self._mtmd.marker

    def tokenize_media(
        self, prompt: str, images: list[LoadedImage], restore: Mapping[str, str] | None = None
    ) -> MediaPrompt:
        """Tokenize a prompt holding one media marker per image (any thread), its text as
        :meth:`tokenize` does.

        Raises:
            ValueError: the markers and images do not match.
            UnicodeEncodeError: the prompt holds lone surrogates.
        """
        assert self._mtmd is not None
        texts = prompt.split(self._mtmd.marker)
        if len(texts) != len(images) + 1:
            raise ValueError("the prompt's media markers do not match its images")
        plans: list[Plan] = [
            [step for step, _ in self._steps(self.special_tokens.plan(text, restore))]
            for text in texts
        ]
        return self._mtmd.tokenize(plans, images, self.special_tokens.text)

    def submit(self, request: GenerationRequest) -> Generation:
        """Queue a generation; iterate ``Generation.events()`` on the calling event loop.

        Raises:
            EngineBusy: every sequence is busy and the queue is full.
            EngineClosed: the engine is shutting down.
        """
        return self.submit_choices([request])[0]

    def submit_choices(self, requests: list[GenerationRequest]) -> list[Generation]:
        """Queue the choices of one request together (all or none). Every choice after
        the first starts from a copy of the first one's prompt cells.

        Raises:
            EngineBusy: the queue cannot take them all.
            EngineClosed: the engine is shutting down.
        """
        loop = asyncio.get_running_loop()
        leader = Generation(requests[0], loop)
        generations = [leader, *(Generation(r, loop, leader) for r in requests[1:])]
        self._scheduler.submit(*generations)
        return generations

    def compile_grammar(self, spec: GrammarSpec) -> CompiledGrammar:
        """Compile a grammar once (any thread), so a bad one fails the request up front;
        the choices of a request given the result copy it instead of compiling it again.

        Raises:
            GrammarError: llama.cpp rejected it.
        """
        return compile_grammar(self._vocab, spec)

    @property
    def model(self) -> _internals.LlamaModel:
        """The loaded llama.cpp model (for a second context, e.g. embeddings)."""
        return self._model

    @property
    def step_clock(self) -> StepClock:
        """The scheduler's step timing (liveness and metrics)."""
        return self._scheduler.step_clock

    def queue_depth(self) -> int:
        running, waiting = self._scheduler.counts()
        return running + waiting

    def load(self) -> dict[str, int]:
        """Gauges: running and waiting generations, KV tokens held, context size."""
        running, waiting = self._scheduler.counts()
        return {
            "running": running,
            "waiting": waiting,
            "kv_tokens": self._scheduler.kv_tokens(),
            "n_ctx": self.info.n_ctx,
        }

    def close(self) -> None:
        if not self._scheduler.close():
            return  # its thread may still touch the context: leak it rather than crash
        self._encoder.shutdown(wait=True, cancel_futures=True)
        if self._draft is not None:
            self._draft.close()
        if self._mtmd is not None:
            self._mtmd.close()
        self._ctx.close()
        self._model.close()

    # ---- owner thread only ----------------------------------------------------------

    def _start(self, generation: Generation) -> Running:
        request = generation.request
        pieces: list[Piece]
        if request.media is not None:
            assert self._mtmd is not None
            mtmd = self._mtmd
            pieces = mtmd.pieces(
                request.media, lambda chunk: self._encoder.submit(mtmd.encode, chunk, self.stats)
            )
            n_prompt = request.media.n_tokens
        else:
            pieces = [list(request.prompt_tokens)]
            n_prompt = len(request.prompt_tokens)
        return Running(
            generation=generation,
            pieces=deque(pieces),
            sampler=TokenSampler(
                request.sampling,
                self._vocab,
                self.info.n_vocab,
                request.grammar,
                piece=self._shown_piece,
                tokenize=self.tokenize,
            ),
            scanner=StopScanner(request.stop),
            n_prompt=n_prompt,
            n_cached=0,
            media=request.media,
        )

    def _decode_image(self, piece: ImagePiece, seq_id: int, n_past: int) -> int:
        assert self._mtmd is not None
        return self._mtmd.decode(piece, self._ctx.ctx, seq_id, n_past, self._ctx.params.n_batch)

    def _piece(self, token: int, special: bool = False) -> bytes:
        """The bytes of one token, special tokens rendered as nothing unless ``special``
        (cached per id and form)."""
        piece = self._pieces.get((token, special))
        if piece is None:
            size = 64
            while True:
                buffer = ctypes.create_string_buffer(size)
                n = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, size, 0, special)
                if n >= 0:
                    break
                size = -n  # a negative result is the size needed
            piece = buffer.raw[:n]
            self._pieces[(token, special)] = piece
        return piece

    def _shown_piece(self, token: int) -> bytes:
        """A token's text as logprobs and grammar triggers show it (specials included)."""
        return self._piece(token, special=True)

    def token_bytes(self, tokens: list[int]) -> bytes:
        """The text bytes of token ids (special tokens as their text), for echoing a
        token-id prompt."""
        return b"".join(self._shown_piece(token) for token in tokens)
