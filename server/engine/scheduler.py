"""Continuous batching on one llama.cpp context: the owner thread and its scheduler step.

One thread owns the context (llama.cpp contexts are not thread-safe). Each step:

1. admits waiting generations (FIFO) to free sequences, reusing the longest cached
   prefix of any sequence (an idle one in place, a busy one through ``seq_cp``);
2. decodes images whose embeddings are ready, one sequence at a time (embedding rows
   never share a ``llama_decode`` with token rows);
3. builds one batch: one token for every generating sequence, then prompt chunks of the
   sequences still prefilling, oldest first, within ``n_batch`` (at most
   ``prefill_chunk`` prompt tokens while any sequence generates, so a long prompt
   cannot freeze running streams);
4. runs one ``llama_decode``, then samples each sequence's output row with its own
   sampler (and reads logprobs from that row when asked).

A text prompt's last row of logits is kept on its sequence. A later request with the
same prompt (a retry, a regeneration, the other choices of ``n``) reuses every cell and
samples its first token from those logits, with no decode: the same logits bit for bit,
which decoding the last token again would not give (llama.cpp's CPU kernels round
differently for different batch sizes). A prompt that only shares a prefix decodes the
rest in one piece, as an uncached prompt does.

With speculation (``speculative.SpecConfig``), a generating sequence's token may be
followed by draft tokens from prompt lookup or a draft model (``draft_model``: one
batched pass for all sequences before the batch is built), in the room the prompt chunks
leave, each with an output row. Its rows are sampled in order while the sample equals the draft; the
first mismatch's sample is the correction and the rejected rows' cells are dropped
(``seq_rm``). Every emitted token is one sample of the sequence's own sampler, as without
speculation, so the output distribution (and greedy output) is unchanged. A step whose
drafts find no free KV cells is retried without drafts.

The 2nd..n-th choices of one request (``n`` > 1) wait until the first choice's prompt is
cached, then start from a copy of its cells. A request for prompt logprobs decodes its
whole prompt with an output row per token, within ``n_outputs_max`` rows per step.

A ``llama_decode`` that finds no free KV cells first drops idle sequences' caches, then
fails the youngest generation in the batch (``kv_cache_full``) and retries without it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import llama_cpp
import numpy as np
from llama_cpp import _internals

from ggufserve.engine.base import (
    EngineStats,
    Failed,
    Finished,
    FinishReason,
    PromptLogprobs,
    TextDelta,
    TokenLogprob,
)
from ggufserve.engine.draft_model import DraftModel
from ggufserve.engine.sampling import GrammarFailure, logits_row, token_logprob
from ggufserve.engine.sequence import (
    IMAGE_ROW,
    ImageDecodeError,
    ImagePiece,
    Running,
    Slot,
    common_prefix,
)
from ggufserve.engine.speculative import Drafter, PromptLookup, SpecConfig
from ggufserve.engine.worker import EngineBusy, EngineClosed, Generation, StepClock

log = logging.getLogger(__name__)

KV_FULL = 1  # llama_decode: no KV cells for the batch (llama.h)


@dataclass(frozen=True)
class ContextLimits:
    """Shape of the serving context.

    Attributes:
        n_parallel: Sequences decoded together (``seq_id`` 0 .. n_parallel-1).
        n_batch: Most rows in one ``llama_decode``.
        prefill_chunk: Most prompt rows per step while any sequence is generating.
        n_swa: Sliding-window size (0: none); with ``swa_full`` False, prefix reuse
            checks the window is still cached (llama.cpp server.cpp's ``pos_min`` check).
        swa_full: The SWA layers keep the whole context (reuse always possible).
        n_outputs_max: Most output (logits) rows in one ``llama_decode``.
        n_vocab: Vocabulary size (length of a logits row).
    """

    n_parallel: int
    n_batch: int
    prefill_chunk: int
    n_swa: int
    swa_full: bool
    n_outputs_max: int
    n_vocab: int


class ContextOps(Protocol):
    """The calls the scheduler makes on its context's batch and KV cache (llama.h's
    ``llama_decode`` and ``llama_memory_seq_*``; positions are [p0, p1), -1 = to the end)."""

    def decode(self, batch: llama_cpp.llama_batch) -> int:
        """Decode the batch; 0 on success, ``KV_FULL`` when no cells fit it, else an error."""
        ...

    def seq_rm(self, seq_id: int, p0: int, p1: int) -> bool:
        """Drop the sequence's cells in [p0, p1); False when that cannot be done."""
        ...

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        """Share ``src``'s cells in [p0, p1) with ``dst``."""
        ...

    def seq_pos_min(self, seq_id: int) -> int:
        """The smallest position the sequence still holds (-1: none)."""
        ...

    def logits(self, row: int) -> np.ndarray:
        """Batch row ``row``'s logits after the last decode (float32, (n_vocab,); a view
        valid until the next decode)."""
        ...


class LlamaContextOps:
    """:class:`ContextOps` on a llama.cpp context."""

    def __init__(self, ctx: _internals.LlamaContext, n_vocab: int):
        self._ctx = ctx
        self._n_vocab = n_vocab
        self._memory = llama_cpp.llama_get_memory(ctx.ctx)

    def decode(self, batch: llama_cpp.llama_batch) -> int:
        return llama_cpp.llama_decode(self._ctx.ctx, batch)

    def seq_rm(self, seq_id: int, p0: int, p1: int) -> bool:
        return bool(llama_cpp.llama_memory_seq_rm(self._memory, seq_id, p0, p1))

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        llama_cpp.llama_memory_seq_cp(self._memory, src, dst, p0, p1)

    def seq_pos_min(self, seq_id: int) -> int:
        return llama_cpp.llama_memory_seq_pos_min(self._memory, seq_id)

    def logits(self, row: int) -> np.ndarray:
        return logits_row(self._ctx, row, self._n_vocab)


class Scheduler:
    """Owns the context's thread, its waiting queue and its sequences.

    Args:
        ctx: The llama.cpp context (``n_seq_max`` ≥ ``limits.n_parallel``, unified KV);
            the samplers and logprobs read its logits rows.
        limits: See :class:`ContextLimits`.
        start: Builds a :class:`Running` for a generation (prompt pieces, sampler...).
        piece: Token id → bytes (special tokens as nothing).
        shown_piece: Token id → bytes for logprobs (special tokens as their text).
        is_eog: Whether a token ends generation.
        decode_image: Decodes an image's embedding rows for one sequence at a position;
            returns the next position.
        stats: Counters to update.
        max_queued: Generations allowed to wait for a sequence; more → EngineBusy.
        name: Thread name, for logs.
        ops: Decode and KV-cache calls (default: :class:`LlamaContextOps` on ``ctx``);
            tests pass fakes to drive the scheduler without a model.
        speculation: Prompt-lookup settings, or None for no speculation. Off anyway with
            a sliding window that does not keep the whole context (``swa_full`` False):
            dropping rejected cells there could lose cells the window still needs.
        draft_model: Drafts from a draft model instead of prompt lookup (with
            ``speculation`` on); it drafts for all generating sequences at once.
    """

    def __init__(
        self,
        ctx: _internals.LlamaContext,
        limits: ContextLimits,
        *,
        start: Callable[[Generation], Running],
        piece: Callable[[int], bytes],
        shown_piece: Callable[[int], bytes],
        is_eog: Callable[[int], bool],
        decode_image: Callable[[ImagePiece, int, int], int],
        stats: EngineStats,
        max_queued: int,
        name: str,
        ops: ContextOps | None = None,
        speculation: SpecConfig | None = None,
        draft_model: DraftModel | None = None,
    ):
        self._ctx = ctx
        self._ops = ops if ops is not None else LlamaContextOps(ctx, limits.n_vocab)
        self._limits = limits
        self._start = start
        self._piece = piece
        self._shown_piece = shown_piece
        self._is_eog = is_eog
        self._decode_image = decode_image
        self.stats = stats
        self._max_queued = max_queued
        self._slots = [Slot(seq_id) for seq_id in range(limits.n_parallel)]
        window_kept = limits.n_swa == 0 or limits.swa_full
        self._speculation = speculation if window_kept else None
        self._draft_model = draft_model
        self._waiting: deque[Generation] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._mean_job_s = 5.0
        self.step_clock = StepClock()  # liveness: /health and /metrics read it
        self._batch = _internals.LlamaBatch(
            n_tokens=limits.n_batch, embd=0, n_seq_max=limits.n_parallel, verbose=False
        )
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    # ---- any thread ------------------------------------------------------------------

    def submit(self, *generations: Generation) -> None:
        """Queue generations (FIFO), all or none: the ``n`` choices of one request.

        Raises:
            EngineBusy: they would not all get a sequence and ``max_queued`` would be
                passed.
            EngineClosed: the engine is shutting down.
        """
        with self._cond:
            if self._closed:
                raise EngineClosed()
            waiting = sum(1 for g in self._waiting if not g.cancelled)
            free = sum(1 for s in self._slots if s.running is None) - waiting
            queued_after = waiting + max(0, len(generations) - max(free, 0))
            if queued_after > waiting and queued_after > self._max_queued:
                per_slot = self._mean_job_s / self._limits.n_parallel
                raise EngineBusy(max(1, math.ceil(per_slot * (waiting + 1))))
            self._waiting.extend(generations)
            self._cond.notify()

    def counts(self) -> tuple[int, int]:
        """(running, waiting) generations."""
        with self._cond:
            return sum(1 for s in self._slots if s.running), len(self._waiting)

    def kv_tokens(self) -> int:
        """KV cells the sequences' caches hold (cells shared by several count once each)."""
        return sum(len(slot.cached) for slot in self._slots)

    def close(self, drain_s: float = 30.0) -> bool:
        """Refuse new work, fail the waiting, let running generations finish (up to
        ``drain_s``), then cancel what is left and join the thread. Returns whether the
        thread stopped (only then may the context be freed)."""
        with self._cond:
            self._closed = True
            for generation in self._waiting:
                generation.emit(Failed())
            self._waiting.clear()
            self._cond.notify_all()
        self._thread.join(drain_s)
        with self._cond:
            for slot in self._slots:
                if slot.running is not None:
                    slot.running.generation.emit(Failed())
                    slot.running.generation.cancel()
        self._thread.join(10)
        if self._thread.is_alive():
            log.error("the scheduler thread did not stop; its context is not freed")
            return False
        self._batch.close()
        return True

    # ---- owner thread ----------------------------------------------------------------

    def _serve(self) -> None:
        while self._wait_for_work():
            self.step_clock.start()
            try:
                self._step()
            except Exception:
                log.exception("scheduler step failed; failing the running generations")
                for slot in self._slots:
                    if slot.running is not None:
                        self._fail(slot, Failed())
            finally:
                self.step_clock.stop()

    def _wait_for_work(self) -> bool:
        with self._cond:
            while not self._closed and not self._waiting and not self._active():
                self._cond.wait()
            return bool(self._active() or self._waiting or not self._closed)

    def _active(self) -> list[Slot]:
        """Busy slots, oldest admission first."""
        busy = [s for s in self._slots if s.running is not None]
        return sorted(busy, key=lambda s: s.running.admitted_at)  # type: ignore[union-attr]

    def _step(self) -> None:
        self._drop_cancelled()
        self._admit()
        for slot in self._active():
            self._decode_ready_image(slot)
        rows = self._fill_batch()
        if not rows:
            # Only images still encoding: wait briefly rather than spin.
            time.sleep(0.002)
            return
        drafts = True
        while (status := self._ops.decode(self._batch.batch)) != 0:
            if status == KV_FULL and drafts and self._has_drafts(rows):
                drafts = False  # speculation never costs a generation its place
                rows = self._fill_batch(drafts=False)
                continue
            if status == KV_FULL and self._make_room(rows):
                rows = self._fill_batch(drafts=False)
                if not rows:
                    return
                continue
            for slot, _, _ in rows:
                if slot.running is not None:
                    log.error("llama_decode returned %d for sequence %d", status, slot.seq_id)
                    self._fail(slot, Failed(code="kv_cache_full" if status == KV_FULL else None))
            return
        self._after_decode(rows)

    def _drop_cancelled(self) -> None:
        for slot in self._active():
            assert slot.running is not None
            if slot.running.generation.cancelled:
                self.stats.requests_cancelled += 1
                self._release(slot)

    def _admit(self) -> None:
        with self._cond:
            while self._waiting:
                free = [s for s in self._slots if s.running is None]
                head = self._waiting[0]
                if head.cancelled:
                    self._waiting.popleft()
                    head.prompt_cached = True  # its followers must not wait on it
                    continue
                if not free or self._closed:
                    return
                if head.leader is not None and not head.leader.prompt_cached:
                    return  # FIFO: nothing overtakes a choice waiting for its prompt
                self._waiting.popleft()
                self._assign(head, free)

    def _assign(self, generation: Generation, free: list[Slot]) -> None:
        """Put a generation on a free sequence, reusing the longest cached prefix."""
        running = self._start(generation)
        # Read before reuse trims the pieces; only a drafter needs it.
        history = (
            [t for p in running.pieces for t in (p if isinstance(p, list) else [-1])]
            if self._speculation is not None and generation.request.speculative
            else []
        )
        head = running.pieces[0] if running.pieces else []
        prompt = head if isinstance(head, list) else []
        text_only = len(running.pieces) == 1 and bool(prompt)
        # A text prompt is reused whole only where its logits were kept (see Slot); else
        # its last token is decoded again, for fresh logits. Prompt logprobs need every
        # row's logits, so nothing is reused.
        reuse = generation.request.prompt_logprobs is None
        limit = len(prompt) - (1 if text_only else 0) if reuse else 0
        source, keep, saved = None, 0, None
        for slot in self._slots:
            shared = common_prefix(slot.cached, prompt)
            logits = slot.logits_after(len(prompt), shared) if text_only and reuse else None
            n = len(prompt) if logits is not None else min(shared, limit)
            if n > keep or (n == keep and n > 0 and slot in free and source not in free):
                source, keep, saved = slot, n, logits
        if source is not None and not self._window_cached(source, keep):
            source, keep, saved = None, 0, None
        if source is not None and source in free:
            target = source
            if not self._ops.seq_rm(target.seq_id, keep, -1):
                keep, saved = 0, None
                self._ops.seq_rm(target.seq_id, 0, -1)
            target.forget(keep)
        else:
            target = min(free, key=lambda s: (len(s.cached) > 0, s.last_used))
            self._ops.seq_rm(target.seq_id, 0, -1)
            target.forget()
            if source is not None and keep > 0:
                self._ops.seq_cp(source.seq_id, target.seq_id, 0, keep)
                target.cached.extend(prompt[:keep])
                target.n_past = keep
        if saved is not None:
            target.keep_logits(saved, keep)
        if keep and keep == len(prompt):
            running.pieces.popleft()  # the whole text before the first image is cached
        elif keep:
            running.pieces[0] = prompt[keep:]
        running.n_cached = keep
        running.keeps_logits = text_only
        running.drafter = self._drafter(generation, history, target.seq_id)
        self.stats.prompt_tokens += running.n_prompt
        self.stats.prompt_tokens_reused += keep
        self.stats.queue_seconds.observe(running.admitted_at - running.submitted_at)
        target.running = running
        if saved is not None:
            self._prompt_ready(target, saved=saved)

    def _drafter(self, generation: Generation, history: list[int], seq_id: int) -> Drafter | None:
        """The generation's drafter (``history``: its prompt, -1 for image rows)."""
        if self._speculation is None or not generation.request.speculative:
            return None
        capacity = len(history) + generation.request.max_tokens + 1
        if self._draft_model is not None:
            return self._draft_model.sequence(seq_id, history, capacity)
        return PromptLookup(history, capacity, self._speculation)

    def _window_cached(self, source: Slot, keep: int) -> bool:
        limits = self._limits
        if keep == 0 or limits.n_swa == 0 or limits.swa_full:
            return True
        pos_min = self._ops.seq_pos_min(source.seq_id)
        return pos_min <= max(0, keep - limits.n_swa)

    def _decode_ready_image(self, slot: Slot) -> None:
        running = slot.running
        assert running is not None
        if running.next_token is not None or not running.pieces:
            return
        head = running.pieces[0]
        if not isinstance(head, ImagePiece) or not head.embedding.done():
            return
        running.pieces.popleft()
        try:
            slot.n_past = self._decode_image_rows(head, slot)
        except ImageDecodeError as exc:
            full = exc.status == KV_FULL
            log.warning("image decode failed for sequence %d: %s", slot.seq_id, exc)
            self._fail(slot, Failed(code="kv_cache_full" if full else None))
            return
        except Exception:
            log.exception("image decode failed for sequence %d", slot.seq_id)
            self._fail(slot, Failed())
            return
        slot.cached.extend([IMAGE_ROW] * head.n_tokens)
        if not running.pieces:  # no text after the image: nothing would give logits
            self._fail(slot, Failed())

    def _decode_image_rows(self, piece: ImagePiece, slot: Slot) -> int:
        """Decode an image's rows for the slot's sequence; returns the next position. With
        no free KV cells, the rows decoded so far and idle sequences' caches are dropped
        and it is tried once more.

        Raises:
            ImageDecodeError: llama.cpp failed (status 1: still no free KV cells).
        """
        try:
            return self._decode_image(piece, slot.seq_id, slot.n_past)
        except ImageDecodeError as exc:
            self._ops.seq_rm(slot.seq_id, slot.n_past, -1)  # the rows of earlier batches
            if exc.status != KV_FULL or not self._drop_idle_caches():
                raise
        return self._decode_image(piece, slot.seq_id, slot.n_past)

    def _drop_idle_caches(self) -> bool:
        """Free the KV cells of every idle sequence; False when none held any."""
        idle = [s for s in self._slots if s.running is None and s.cached]
        for slot in idle:
            self._ops.seq_rm(slot.seq_id, 0, -1)
            slot.forget()
        return bool(idle)

    def _fill_batch(self, drafts: bool = True) -> list[tuple[Slot, int, bool]]:
        """Fill the batch; returns (slot, rows added, has output row) per sequence in it.
        A generating sequence's rows are its token then its draft (``running.draft``),
        all output rows; drafts (when ``drafts``) get only the room prompt chunks leave."""
        batch = self._batch.batch
        batch.n_tokens = 0
        rows: list[tuple[Slot, int, bool]] = []

        def add(slot: Slot, tokens: list[int], output: bool, every: bool = False) -> None:
            # every: an output row for each token (prompt scoring, draft verification).
            for i, token in enumerate(tokens):
                j = batch.n_tokens
                batch.token[j] = token
                batch.pos[j] = slot.n_past + i
                batch.n_seq_id[j] = 1
                batch.seq_id[j][0] = slot.seq_id
                batch.logits[j] = output and (every or i == len(tokens) - 1)
                batch.n_tokens += 1
            rows.append((slot, len(tokens), output))

        active = self._active()
        generating = [s for s in active if s.running.next_token is not None]  # type: ignore[union-attr]
        chunks = self._plan_prefill(active, len(generating))
        room = self._limits.n_batch - len(generating) - sum(len(c[1]) for c in chunks)
        outputs = self._limits.n_outputs_max - len(generating)
        outputs -= sum(len(take) if every else output for _, take, output, every in chunks)
        if drafts and self._draft_model is not None:
            # One batched pass drafts for every sequence; _draft then hands them out.
            drafters = [slot.running.drafter for slot in generating]  # type: ignore[union-attr]
            self._draft_model.prepare(drafters, min(room, outputs))
        for slot in generating:
            running = slot.running
            assert running is not None and running.next_token is not None
            running.draft = self._draft(running, min(room, outputs)) if drafts else []
            room -= len(running.draft)
            outputs -= len(running.draft)
            add(slot, [running.next_token, *running.draft], True, every=True)
        for slot, take, output, every in chunks:
            add(slot, take, output, every)
        return rows

    def _plan_prefill(
        self, active: list[Slot], n_generating: int
    ) -> list[tuple[Slot, list[int], bool, bool]]:
        """The prompt chunks of this step: (slot, tokens, has an output row (the prompt's
        last token, or scored), scored: an output row for each token)."""
        chunks: list[tuple[Slot, list[int], bool, bool]] = []
        budget = self._limits.n_batch - n_generating
        if n_generating:
            budget = min(budget, self._limits.prefill_chunk)
        # Output rows left for prompt logprobs; one kept for each prompt that may end here.
        outputs = self._limits.n_outputs_max - n_generating - len(active)
        for slot in active:
            running = slot.running
            assert running is not None
            if budget <= 0 or running.next_token is not None or not running.pieces:
                continue
            head = running.pieces[0]
            if not isinstance(head, list):
                continue
            if not head:  # an empty text chunk between two images
                running.pieces.popleft()
                continue
            scoring = running.generation.request.prompt_logprobs is not None
            if scoring and outputs <= 0:
                continue
            take = head[: min(budget, outputs) if scoring else budget]
            last = len(take) == len(head) and len(running.pieces) == 1
            if scoring:
                outputs -= len(take)
            chunks.append((slot, take, scoring or last, scoring))
            budget -= len(take)
        return chunks

    def _draft(self, running: Running, room: int) -> list[int]:
        """Draft tokens for a generating sequence: at most ``room``, and never past its
        ``max_tokens`` (so never past the context)."""
        if running.drafter is None:
            return []
        left = running.max_tokens - running.completion_tokens - 1
        return running.drafter.propose(min(room, left))

    @staticmethod
    def _has_drafts(rows: list[tuple[Slot, int, bool]]) -> bool:
        return any(slot.running is not None and slot.running.draft for slot, _, _ in rows)

    def _make_room(self, rows: list[tuple[Slot, int, bool]]) -> bool:
        """After a KV-full decode: drop idle caches, else fail the youngest generation in
        the batch. False when there is nothing left to give up."""
        if self._drop_idle_caches():
            return True
        in_batch = [slot for slot, _, _ in rows]
        victim = max(in_batch, key=lambda s: s.running.admitted_at)  # type: ignore[union-attr]
        log.warning("KV cache full: failing the generation on sequence %d", victim.seq_id)
        self._fail(victim, Failed(code="kv_cache_full"))
        return any(slot.running is not None for slot in in_batch)

    def _after_decode(self, rows: list[tuple[Slot, int, bool]]) -> None:
        index = 0
        for slot, n_rows, output in rows:
            running = slot.running
            assert running is not None
            batch = self._batch.batch
            first = index
            slot.cached.extend(batch.token[index + i] for i in range(n_rows))
            slot.n_past += n_rows
            index += n_rows
            prefilling = running.next_token is None
            if prefilling:
                head = running.pieces[0]
                assert isinstance(head, list)
                if running.generation.request.prompt_logprobs is not None:
                    self._score_prompt(running, first, head[:n_rows])
                del head[:n_rows]
                if not head:
                    running.pieces.popleft()
            if not output or (prefilling and running.pieces):
                continue  # a scored prompt chunk that is not the prompt's end
            if prefilling:
                self._prompt_ready(slot, row=index - 1)
            else:
                self._verify(slot, first, running.draft)

    def _score_prompt(self, running: Running, first: int, tokens: list[int]) -> None:
        """Logprobs of a prompt chunk's tokens; row ``first + i`` predicts the token after
        ``tokens[i]`` (the prompt's next token, or the first generated one)."""
        request = running.generation.request
        top_n = request.prompt_logprobs or 0
        scored = running.prompt_logprobs
        prompt = request.prompt_tokens
        if not scored:
            scored.append(TokenLogprob(prompt[0], self._shown_piece(prompt[0]), None))
        for i in range(len(tokens)):
            position = len(scored)
            if position >= len(prompt):
                break
            logits = self._ops.logits(first + i)
            scored.append(token_logprob(logits, prompt[position], top_n, self._shown_piece))

    def _prompt_ready(self, slot: Slot, *, row: int = -1, saved: np.ndarray | None = None) -> None:
        """The prompt is all in the KV cache: followers may copy it; a scoring-only
        request (``max_tokens`` 0) ends here, others sample their first token from batch
        row ``row`` or from the kept logits ``saved`` (a repeated prompt, not decoded)."""
        running = slot.running
        assert running is not None
        running.generation.prompt_cached = True
        if running.prompt_logprobs:
            running.generation.emit(PromptLogprobs(tuple(running.prompt_logprobs)))
        if running.max_tokens == 0:
            self._finish(slot, "length")
            return
        if saved is None and running.keeps_logits:
            # Copied: the row is llama.cpp's buffer, rewritten by the next decode.
            slot.keep_logits(self._ops.logits(row).copy(), len(slot.cached))
        if (token := self._sample(slot, row, saved)) is not None:
            self._accept(slot, token)

    def _verify(self, slot: Slot, first: int, draft: list[int]) -> None:
        """Sample rows ``first``.. (the sequence's token, then ``draft``) in order while
        each sample equals the draft token decoded after it; drop the cells of the draft
        tokens not kept."""
        running = slot.running
        assert running is not None
        kept = 0
        # Counted before any token is accepted: the last one's Finished event may wake a
        # reader of the counters.
        self.stats.spec_drafted_tokens += len(draft)
        for i in range(len(draft) + 1):
            if i and running.generation.cancelled:
                break  # the next step releases it
            token = self._sample(slot, first + i)
            if token is None:
                return  # failed: the sequence's cells are gone already
            matched = i < len(draft) and token == draft[i]
            kept += matched
            self.stats.spec_accepted_tokens += matched
            self._accept(slot, token)
            if not matched or slot.running is None:
                break
        if not draft:
            return
        assert running.drafter is not None
        running.drafter.record(len(draft), kept)
        if rejected := len(draft) - kept:
            slot.n_past -= rejected
            del slot.cached[-rejected:]
            self._ops.seq_rm(slot.seq_id, slot.n_past, -1)

    def _sample(self, slot: Slot, row: int, saved: np.ndarray | None = None) -> int | None:
        """The sequence's next token from batch row ``row``, or from the kept logits
        ``saved`` (logprobs noted when asked); None when its grammar failed it."""
        running = slot.running
        assert running is not None
        request = running.generation.request
        logits = None
        if request.logprobs is not None:
            # Copied before sampling: the row is llama.cpp's buffer.
            logits = saved if saved is not None else self._ops.logits(row).copy()
        try:
            token = running.sampler.sample(self._ctx, row, saved)
        except GrammarFailure as exc:
            # Only this sequence ends; the others in the batch go on.
            log.warning("generation failed by its grammar: %s", exc)
            self._fail(slot, Failed(code=exc.code))
            return None
        if logits is not None and not self._is_eog(token):
            running.logprobs.append(
                token_logprob(logits, token, request.logprobs or 0, self._shown_piece)
            )
        return token

    def _accept(self, slot: Slot, token: int) -> None:
        running = slot.running
        assert running is not None
        if running.first_token_at is None:
            running.first_token_at = time.monotonic()
            self.stats.ttft_seconds.observe(running.first_token_at - running.submitted_at)
        if self._is_eog(token):
            self._finish(slot, "stop")
            return
        running.completion_tokens += 1
        self.stats.generated_tokens += 1
        text, stopped = running.scanner.feed(self._piece(token))
        if text:
            self._emit_text(running, text)
        if stopped:
            running.logprobs.clear()  # tokens wholly inside the stop string
            self._finish(slot, "stop", flush=False)
        elif running.completion_tokens >= running.max_tokens:
            self._finish(slot, "length")
        else:
            running.next_token = token
            if running.drafter is not None:
                running.drafter.push(token)

    def _finish(self, slot: Slot, reason: FinishReason, *, flush: bool = True) -> None:
        running = slot.running
        assert running is not None
        tail = running.scanner.flush() if flush else ""
        if tail or running.logprobs:
            self._emit_text(running, tail)
        self.stats.requests_finished += 1
        running.generation.emit(
            Finished(
                reason,
                running.n_prompt,
                running.completion_tokens,
                running.n_cached,
                running.scanner.matched,
            )
        )
        self._mean_job_s = 0.8 * self._mean_job_s + 0.2 * (time.monotonic() - running.admitted_at)
        self._release(slot)

    def _emit_text(self, running: Running, text: str) -> None:
        running.generation.emit(TextDelta(text, tuple(running.logprobs)))
        running.logprobs.clear()

    def _fail(self, slot: Slot, event: Failed) -> None:
        assert slot.running is not None
        slot.running.generation.emit(event)
        self._ops.seq_rm(slot.seq_id, 0, -1)
        slot.forget()
        self._release(slot)

    def _release(self, slot: Slot) -> None:
        """Free the sequence, keeping its cache for prefix reuse."""
        assert slot.running is not None
        slot.running.sampler.close()
        slot.running.generation.prompt_cached = True  # followers never wait on an ended one
        slot.running = None
        slot.last_used = time.monotonic()
        # A cached prefix ending in image rows is kept: comparison stops at IMAGE_ROW.
        with self._cond:
            self._cond.notify_all()
