"""Draft-model speculation: a small model with the served model's vocabulary proposes the
next tokens of every generating sequence, and the scheduler verifies them in its one
``llama_decode`` (see ``scheduler``).

The draft model has its own llama.cpp context (one ``seq_id`` per served sequence,
unified KV of the served context's size, f16 cells) on the scheduler's thread. Once per
step, :meth:`DraftModel.prepare` drafts for all generating sequences together:

1. catch-up: each sequence's history (prompt and accepted output) not yet in the draft
   cache is decoded (after dropping the cells of rejected drafts: the cache is compared
   with the history), all sequences in the same batches;
2. drafting: one ``llama_decode`` per draft position, one row per sequence still
   drafting; each sequence takes the draft model's most likely token (greedy) and stops
   at its adaptive length (:class:`~ggufserve.engine.speculative.AdaptiveLength`), at a
   token whose draft probability is below ``p_min``, or after an end-of-generation token.

The drafts are verified as prompt-lookup drafts are: every emitted token is a sample of
the sequence's own sampler (grammar included), kept while it equals the draft token. A
draft is a deterministic function of the history, so it does not bias those samples: the
output distribution, and greedy output, are those of decoding without speculation.
Sequences with image rows get no drafts (the draft model has no projector, so its
positions would not line up with the served model's).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp import _internals

from ggufserve.engine.base import ModelLoadError
from ggufserve.engine.native_load import load_model, new_context
from ggufserve.engine.sampling import logits_row
from ggufserve.engine.sequence import common_prefix
from ggufserve.engine.speculative import AdaptiveLength, Drafter

log = logging.getLogger(__name__)

KV_FULL = 1  # llama_decode: no KV cells for the batch (llama.h)


class DraftSequence:
    """One generation's drafts from a :class:`DraftModel` (a scheduler ``Drafter``).

    Args:
        model: The draft model that fills :attr:`pending`.
        seq_id: The sequence in the draft context (the served sequence's id).
        history: The prompt's token ids (text only).
        end: History length at which the generation's ``max_tokens`` is reached.
        n_max: Most draft tokens per step.
    """

    def __init__(self, model: DraftModel, seq_id: int, history: list[int], end: int, n_max: int):
        self.model = model
        self.seq_id = seq_id
        self.history = history
        self.end = end
        self.length = AdaptiveLength(n_max)
        self.pending: list[int] = []  # this step's draft, made by DraftModel.prepare
        self.synced = 0  # leading history tokens known to be in the draft cache

    def push(self, token: int) -> None:
        self.history.append(token)

    def propose(self, room: int) -> list[int]:
        """This step's draft (from :meth:`DraftModel.prepare`), cut to ``room``."""
        draft, self.pending = self.pending[: max(room, 0)], []
        return draft

    def record(self, drafted: int, accepted: int) -> None:
        self.length.record(drafted, accepted)


class _DecodeFailed(Exception):
    pass


class DraftModel:
    """A draft model and its context, drafting for up to ``n_parallel`` sequences.

    Args:
        path: The draft GGUF.
        target: The served model, whose vocabulary the draft model must share.
        target_name: The served model's file name, for error messages.
        n_ctx: Cells of the draft context (the served context's size).
        n_parallel: Sequences (``seq_id`` 0 .. n_parallel-1).
        n_batch: Most rows per draft ``llama_decode`` (catch-up is split into such chunks).
        n_threads: CPU threads.
        n_gpu_layers: Layers to offload (-1: all).
        n_max: Most draft tokens per sequence and step.
        p_min: A draft stops before a token whose draft probability is below this.

    Raises:
        ModelLoadError: llama.cpp could not load the file or make the context, or the
            vocabularies differ (the message names both files, not their folders).
    """

    def __init__(
        self,
        path: Path,
        *,
        target: _internals.LlamaModel,
        target_name: str,
        n_ctx: int,
        n_parallel: int,
        n_batch: int,
        n_threads: int,
        n_gpu_layers: int,
        n_max: int,
        p_min: float,
    ):
        self._n_max = n_max
        self._p_min = p_min
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = n_gpu_layers
        self._model = load_model(
            path, model_params, f"llama.cpp could not load the draft model file {path.name}"
        )
        self._vocab = llama_cpp.llama_model_get_vocab(self._model.model)
        problem = vocab_difference(llama_cpp.llama_model_get_vocab(target.model), self._vocab)
        if problem is not None:
            self._model.close()
            raise ModelLoadError(
                f"the draft model {path.name} cannot draft for {target_name}: {problem}"
            )
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = n_parallel
        params.n_outputs_max = n_parallel  # one logits row per drafting sequence
        params.kv_unified = True
        params.swa_full = True  # rejected drafts' cells are dropped: keep every cell
        params.n_threads = params.n_threads_batch = n_threads
        self._ctx = new_context(
            self._model,
            params,
            f"llama.cpp could not create a context of {n_ctx} tokens for the draft model "
            f"{path.name}",
        )
        self._memory = llama_cpp.llama_get_memory(self._ctx.ctx)
        self._n_batch = n_batch
        self._batch = _internals.LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=1, verbose=False)
        # Tokens in the draft cache per seq_id, in position order.
        self._cached: list[list[int]] = [[] for _ in range(n_parallel)]

    def sequence(self, seq_id: int, history: list[int], capacity: int) -> DraftSequence | None:
        """A drafter for a generation starting on ``seq_id`` with this prompt (``capacity``:
        prompt + ``max_tokens`` + 1); None when the prompt holds image rows (negative ids)."""
        if any(token < 0 for token in history):
            return None
        drafter = DraftSequence(self, seq_id, list(history), capacity - 1, self._n_max)
        drafter.synced = common_prefix(self._cached[seq_id], drafter.history)
        return drafter

    def prepare(self, drafters: Sequence[Drafter | None], room: int) -> None:
        """Make this step's draft (``pending``) for each of this model's drafters among
        ``drafters`` (in order, at most ``room`` tokens in all); a sequence's draft never
        reaches its ``max_tokens``. A failed draft decode drops every draft cell and
        leaves the drafts made so far."""
        jobs: list[tuple[DraftSequence, int]] = []
        for drafter in drafters:
            if not isinstance(drafter, DraftSequence) or drafter.model is not self:
                continue
            drafter.pending = []
            if room <= 0:
                continue
            limit = min(room, drafter.length.limit(), drafter.end - len(drafter.history) - 1)
            if limit > 0:
                jobs.append((drafter, limit))
                room -= limit
        if not jobs:
            return
        try:
            self._draft(jobs)
        except _DecodeFailed:
            log.warning("draft model decode failed; its cache is cleared")
            llama_cpp.llama_memory_clear(self._memory, True)
            for cached in self._cached:
                cached.clear()

    def close(self) -> None:
        """Free the context and the model (owner thread stopped)."""
        self._batch.close()
        self._ctx.close()
        self._model.close()

    # ---- owner thread ----------------------------------------------------------------

    def _draft(self, jobs: list[tuple[DraftSequence, int]]) -> None:
        best = self._catch_up([drafter for drafter, _ in jobs])
        limits = dict(jobs)
        while True:
            rows: list[tuple[DraftSequence, int]] = []
            for drafter, limit in limits.items():
                if drafter not in best:
                    continue
                token, p = best.pop(drafter)
                if p < self._p_min:
                    continue
                drafter.pending.append(token)
                if len(drafter.pending) < limit and not llama_cpp.llama_vocab_is_eog(
                    self._vocab, token
                ):
                    rows.append((drafter, token))
            if not rows:
                return
            self._decode([(d, token, len(self._cached[d.seq_id]), True) for d, token in rows])
            for i, (drafter, token) in enumerate(rows):
                self._cached[drafter.seq_id].append(token)
                best[drafter] = self._most_likely(i)

    def _catch_up(self, drafters: list[DraftSequence]) -> dict[DraftSequence, tuple[int, float]]:
        """Decode each sequence's history not yet cached (at least its last token); returns
        each one's most likely next token and its probability."""
        rows: list[tuple[DraftSequence, int, int, bool]] = []
        for drafter in drafters:
            keep = self._trim(drafter)
            tail = drafter.history[keep:]
            rows.extend(
                (drafter, token, keep + i, i == len(tail) - 1) for i, token in enumerate(tail)
            )
        best: dict[DraftSequence, tuple[int, float]] = {}
        for start in range(0, len(rows), self._n_batch):
            chunk = rows[start : start + self._n_batch]
            self._decode(chunk)
            for i, (drafter, token, _, last) in enumerate(chunk):
                self._cached[drafter.seq_id].append(token)
                if last:
                    best[drafter] = self._most_likely(i)
        for drafter in drafters:
            drafter.synced = len(drafter.history)
        return best

    def _trim(self, drafter: DraftSequence) -> int:
        """Drop the sequence's cells past its common prefix with the history (rejected
        drafts), keeping at least the last history token to decode; returns cells kept."""
        cached, history = self._cached[drafter.seq_id], drafter.history
        n = min(drafter.synced, len(cached))  # compared before: only the rest is new
        while n < len(cached) and n < len(history) and cached[n] == history[n]:
            n += 1
        keep = min(n, len(history) - 1)
        if keep < len(cached):
            if not llama_cpp.llama_memory_seq_rm(self._memory, drafter.seq_id, keep, -1):
                llama_cpp.llama_memory_seq_rm(self._memory, drafter.seq_id, 0, -1)
                keep = 0
            del cached[keep:]
        drafter.synced = keep
        return keep

    def _decode(self, rows: Sequence[tuple[DraftSequence, int, int, bool]]) -> None:
        """One ``llama_decode`` of (sequence, token, position, wants logits) rows. A full
        cache first drops idle sequences' cells. Raises: _DecodeFailed."""
        batch = self._batch.batch
        batch.n_tokens = len(rows)
        for j, (drafter, token, pos, output) in enumerate(rows):
            batch.token[j] = token
            batch.pos[j] = pos
            batch.n_seq_id[j] = 1
            batch.seq_id[j][0] = drafter.seq_id
            batch.logits[j] = output
        status = llama_cpp.llama_decode(self._ctx.ctx, batch)
        if status == KV_FULL:
            busy = {drafter.seq_id for drafter, *_ in rows}
            idle = [s for s, cached in enumerate(self._cached) if s not in busy and cached]
            for seq_id in idle:
                llama_cpp.llama_memory_seq_rm(self._memory, seq_id, 0, -1)
                self._cached[seq_id].clear()
            if idle:
                status = llama_cpp.llama_decode(self._ctx.ctx, batch)
        if status != 0:
            raise _DecodeFailed(status)

    def _most_likely(self, row: int) -> tuple[int, float]:
        """The draft model's most likely token at output row ``row`` and its probability."""
        logits = logits_row(self._ctx, row, self._n_vocab)
        token = int(logits.argmax())
        return token, 1.0 / float(np.exp(logits - logits[token]).sum(dtype=np.float64))


def vocab_difference(target: llama_cpp.llama_vocab_p, draft: llama_cpp.llama_vocab_p) -> str | None:
    """Why ``draft`` cannot draft for ``target`` (a short reason), or None when they are the
    same vocabulary: same type, size, BOS/EOS/EOT ids and BOS/EOS insertion, and the same
    text for every token id (llama.cpp's own check compares the text of ids 5 and up and
    tolerates a size difference; a draft token must mean the same to the served model)."""
    named = {
        "vocabulary type": llama_cpp.llama_vocab_type,
        "size": llama_cpp.llama_vocab_n_tokens,
        "BOS token": llama_cpp.llama_vocab_bos,
        "EOS token": llama_cpp.llama_vocab_eos,
        "EOT token": llama_cpp.llama_vocab_eot,
        "BOS insertion": llama_cpp.llama_vocab_get_add_bos,
        "EOS insertion": llama_cpp.llama_vocab_get_add_eos,
    }
    for what, read in named.items():
        if read(target) != read(draft):
            return f"the vocabularies differ in {what} ({read(target)} vs {read(draft)})"
    get_text = llama_cpp.llama_vocab_get_text
    for token in range(llama_cpp.llama_vocab_n_tokens(target)):
        if get_text(target, token) != get_text(draft, token):
            return f"the vocabularies differ at token id {token}"
    return None
