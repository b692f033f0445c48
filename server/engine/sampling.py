"""One llama.cpp sampler per sequence, built from a request's sampling settings and its
optional grammar, and the log-probabilities of the tokens it picks."""

from __future__ import annotations

import ctypes
import logging
import re
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import llama_cpp
import numpy as np
from llama_cpp import _internals

from ggufserve.engine.base import GrammarSpec, SamplingParams, TokenLogprob

log = logging.getLogger(__name__)

# llama.cpp's server default for the penalty window (common/common.h, penalty_last_n).
PENALTY_LAST_N = 64
# llama_token_data's layout (llama.h): id, logit, p.
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
# Most grammar work one step of one sequence may take on the owner thread. Measured on the
# bundled Gemma 3 (262k vocabulary, tests/bench/grammar_cost.py): a full-vocabulary check
# costs 25-105 ms for ordinary schemas and up to ~360 ms for the widest the limits of
# ggufserve.grammar.cost allow; a prefiltered step (below) ~3 ms. Above this: a runaway.
MAX_GRAMMAR_STEP_S = 0.5
# A constrained step first checks the grammar on this many most likely tokens only (plus
# logit-biased ones); the whole vocabulary only if none of them fits.
GRAMMAR_PREFILTER_TOKENS = 1024


class GrammarError(ValueError):
    """llama.cpp could not parse a GBNF grammar."""


class GrammarFailure(RuntimeError):
    """The grammar stopped this sequence; ``code`` says why (for the client)."""

    code = "grammar_failed"


class GrammarDeadEnd(GrammarFailure):
    """The grammar refuses every token: the output cannot go on and stay valid."""

    code = "grammar_dead_end"


class GrammarTooExpensive(GrammarFailure):
    """One step's grammar work took longer than the sampler's ``max_grammar_step_s``."""

    code = "grammar_too_expensive"


def make_chain(params: SamplingParams, n_vocab: int) -> _internals.LlamaSampler:
    """Bias, penalties, then greedy or top-k/top-p/min-p/temperature/dist (llama.cpp's
    common_sampler order). The chain keeps its own RNG (seeded) and penalty history, so
    sequences sampled in one batch never affect each other."""
    sampler = _internals.LlamaSampler()
    if params.logit_bias:
        sampler.add_logit_bias(n_vocab, params.logit_bias)
    penalties = (params.repeat_penalty, params.frequency_penalty, params.presence_penalty)
    if penalties != (1.0, 0.0, 0.0):
        sampler.add_penalties(n_vocab, PENALTY_LAST_N, *penalties)
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


def init_grammar(vocab: llama_cpp.llama_vocab_p, spec: GrammarSpec) -> llama_cpp.llama_sampler_p:
    """A llama.cpp grammar sampler for ``spec.gbnf`` (root ``root``), always active: lazy
    triggering is :class:`TokenSampler`'s. Free it with ``llama_sampler_free``.

    Raises:
        GrammarError: llama.cpp rejected the grammar (it returns NULL).
    """
    grammar = llama_cpp.llama_sampler_init_grammar(vocab, spec.gbnf.encode("utf-8"), b"root")
    if not grammar:
        raise GrammarError("llama.cpp could not parse the grammar")
    return grammar


@dataclass(frozen=True)
class CompiledGrammar(GrammarSpec):
    """A :class:`GrammarSpec` with its grammar already compiled for one vocabulary: each
    :class:`TokenSampler` built from it starts from a copy (``llama_sampler_clone``), so
    the choices of one request share one compile. Made by :func:`compile_grammar`; the
    compiled sampler is freed with the last reference to this object."""

    sampler: llama_cpp.llama_sampler_p = field(kw_only=True, compare=False, repr=False)

    def __post_init__(self) -> None:
        weakref.finalize(self, llama_cpp.llama_sampler_free, self.sampler)

    def copy(self) -> llama_cpp.llama_sampler_p:
        """A fresh grammar sampler in the start state (free it with ``llama_sampler_free``)."""
        return llama_cpp.llama_sampler_clone(self.sampler)


def compile_grammar(vocab: llama_cpp.llama_vocab_p, spec: GrammarSpec) -> CompiledGrammar:
    """Compile ``spec`` once (any thread), for every choice of a request to copy.

    Raises:
        GrammarError: llama.cpp rejected the grammar.
    """
    sampler = init_grammar(vocab, GrammarSpec(spec.gbnf))
    return CompiledGrammar(spec.gbnf, spec.trigger_patterns, spec.trigger_tokens, sampler=sampler)


def logits_row(ctx: _internals.LlamaContext, index: int, n_vocab: int) -> np.ndarray:
    """The logits of batch row ``index`` (a view into llama.cpp's buffer, valid until the
    next decode): float32, shape (n_vocab,)."""
    pointer = llama_cpp.llama_get_logits_ith(ctx.ctx, index)
    return np.ctypeslib.as_array(pointer, shape=(n_vocab,))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Natural-log softmax in float64 (the sum over 262k entries needs the precision)."""
    shifted = logits.astype(np.float64) - float(logits.max())
    return shifted - np.log(np.exp(shifted).sum())


def token_logprob(
    logits: np.ndarray, token: int, top_n: int, piece: Callable[[int], bytes]
) -> TokenLogprob:
    """``token``'s logprob under a raw logits row and the ``top_n`` best (sorted, best
    first), as OpenAI reports them: from the model's distribution, before any sampler."""
    logprobs = log_softmax(logits)
    top: tuple[tuple[bytes, float], ...] = ()
    if top_n > 0:
        best = np.argpartition(logprobs, -top_n)[-top_n:]
        best = best[np.argsort(-logprobs[best], kind="stable")]
        top = tuple((piece(int(t)), float(logprobs[t])) for t in best)
    return TokenLogprob(token, piece(token), float(logprobs[token]), top)


def _grammar_sampler(
    vocab: llama_cpp.llama_vocab_p, grammar: GrammarSpec
) -> llama_cpp.llama_sampler_p:
    if isinstance(grammar, CompiledGrammar):
        return grammar.copy()
    return init_grammar(vocab, GrammarSpec(grammar.gbnf))


class TokenSampler:
    """A sequence's sampler: the chain of :func:`make_chain`, and a grammar checked the way
    llama.cpp's common_sampler does it: the chain samples from the raw logits, the grammar
    checks that one token, and only if it is rejected is the grammar applied to the whole
    vocabulary and the chain run again (grammar over 262k tokens every step is slow).

    A lazy grammar (``GrammarSpec.lazy``) is triggered here rather than by llama.cpp's
    lazy sampler: when a trigger token is sampled or a trigger pattern first matches the
    output (regex search; the grammar starts at the first non-empty group), the text from
    there is replayed into the grammar token by token, each checked before it is accepted.
    llama.cpp's own replay accepts unchecked text, and a refusal there aborts the process;
    here a replay the grammar refuses just leaves the output free (the parser still reads
    it).

    A constrained step first applies the grammar to the ``GRAMMAR_PREFILTER_TOKENS`` most
    likely tokens (and any logit-biased ones), and to the whole vocabulary only if none of
    them fits: exact for greedy and top-k up to the number that fit, and otherwise it only
    leaves out tokens below the 1024th most likely (measured: ~3 ms against 25-105 ms).

    Args:
        params: Sampling settings.
        vocab: The model's vocabulary (for the grammar).
        n_vocab: Vocabulary size.
        grammar: Optional constraint; a :class:`CompiledGrammar` is copied, not compiled.
        piece: Token id → its text bytes, special tokens included (for triggers).
        tokenize: Text → token ids, special tokens parsed (for the replay).
        max_grammar_step_s: Most seconds of CPU time (this thread's) of grammar work in one
            :meth:`sample` call.

    Raises:
        GrammarError: the grammar does not parse.
    """

    def __init__(
        self,
        params: SamplingParams,
        vocab: llama_cpp.llama_vocab_p,
        n_vocab: int,
        grammar: GrammarSpec | None = None,
        *,
        piece: Callable[[int], bytes] | None = None,
        tokenize: Callable[[str], list[int]] | None = None,
        max_grammar_step_s: float = MAX_GRAMMAR_STEP_S,
    ):
        self._n_vocab = n_vocab
        self._max_grammar_step_s = max_grammar_step_s
        biased = [t for t in params.logit_bias if 0 <= t < n_vocab]
        self._biased = np.array(biased, dtype=np.int32)
        self._spec = grammar
        self._grammar = _grammar_sampler(vocab, grammar) if grammar else None
        self._active = grammar is not None and not grammar.lazy
        self._output = ""  # text so far, searched for triggers while the grammar waits
        self._piece = piece
        self._tokenize = tokenize
        self._chain = make_chain(params, n_vocab)
        # Greedy over biased logits, no penalties: the chain's pick is an argmax, done in
        # numpy without llama_sampler_sample's copy of the vocabulary into token data.
        neutral = (params.repeat_penalty, params.frequency_penalty, params.presence_penalty)
        self._argmax = params.temperature == 0.0 and neutral == (1.0, 0.0, 0.0)
        self._bias_values = np.array([params.logit_bias[t] for t in biased], dtype=np.float32)
        self._data = np.zeros(n_vocab if grammar is not None else 0, dtype=TOKEN_DATA)
        self._ids = np.arange(len(self._data), dtype=np.int32)

    def sample(
        self, ctx: _internals.LlamaContext, index: int, saved: np.ndarray | None = None
    ) -> int:
        """Pick (and accept) the next token from batch row ``index``, or from ``saved``, a
        logits row kept from an earlier decode (float32, shape (n_vocab,)) when given.

        Raises:
            GrammarDeadEnd: the grammar refuses every token (the sequence must end).
            GrammarTooExpensive: this step's grammar work (trigger replay, checks,
                constrained pick, accept) took over ``max_grammar_step_s``; the token
                was accepted, but the sequence should end.
        """
        if self._grammar is None:
            return self._chain_sample(ctx, index, saved)
        # This thread's CPU time, not wall time: on a busy machine (other processes, the GIL)
        # a legitimate step must not look like a runaway grammar.
        start_s = time.thread_time()
        token = self._sample_with_grammar(ctx, index, saved)
        elapsed_s = time.thread_time() - start_s
        if elapsed_s > self._max_grammar_step_s:
            raise GrammarTooExpensive(
                f"one grammar step took {elapsed_s:.2f} s of CPU time "
                f"(bound {self._max_grammar_step_s} s)"
            )
        return token

    def _chain_sample(
        self, ctx: _internals.LlamaContext, index: int, saved: np.ndarray | None
    ) -> int:
        """The chain's pick, accepted: in C from the batch row, else from ``saved`` (the
        same steps as llama_sampler_sample: apply the chain to every token, accept)."""
        if self._argmax:
            token = self._biased_argmax(
                saved if saved is not None else logits_row(ctx, index, self._n_vocab)
            )
        elif saved is None:
            return self._chain.sample(ctx, index)
        else:
            picked = self._pick(saved)
            assert picked is not None  # no grammar applied: the chain always selects
            token = picked
        self._chain.accept(token)
        return token

    def _biased_argmax(self, logits: np.ndarray) -> int:
        """What the logit-bias + greedy chain picks: the first highest biased logit (the
        greedy sampler keeps the first maximum in id order, as np.argmax does)."""
        if len(self._biased):
            logits = logits.copy()  # never write into llama.cpp's buffer or kept logits
            logits[self._biased] += self._bias_values
        return int(np.argmax(logits))

    def _sample_with_grammar(
        self, ctx: _internals.LlamaContext, index: int, saved: np.ndarray | None
    ) -> int:
        if not self._active:
            token = self._chain_sample(ctx, index, saved)
            self._watch(token)
            return token
        logits = saved if saved is not None else logits_row(ctx, index, self._n_vocab)
        picked = self._pick(logits)
        allowed = picked is not None and self._allowed(picked)
        token = picked if picked is not None and allowed else self._pick_constrained(logits)
        llama_cpp.llama_sampler_accept(self._grammar, token)
        self._chain.accept(token)
        return token

    def _pick_constrained(self, logits: np.ndarray) -> int:
        """The chain's pick among the tokens the grammar allows (prefiltered first)."""
        likely = np.argpartition(logits, -GRAMMAR_PREFILTER_TOKENS)[-GRAMMAR_PREFILTER_TOKENS:]
        if len(self._biased):
            likely = np.union1d(likely, self._biased)
        token = self._pick(logits, likely, constrained=True)
        if token is None:
            token = self._pick(logits, constrained=True)
        if token is None:
            raise GrammarDeadEnd("the grammar refuses every token")
        return token

    def _watch(self, token: int) -> None:
        spec = self._spec
        assert spec is not None and self._piece is not None
        text = self._piece(token).decode("utf-8", errors="replace")
        if token in spec.trigger_tokens:
            self._activate(text)
            return
        self._output += text
        for pattern in spec.trigger_patterns:
            match = re.search(pattern, self._output)
            if match is not None:
                groups = [i for i in range(1, (match.lastindex or 0) + 1) if match.group(i)]
                start = match.start(groups[0]) if groups else match.start()
                self._activate(self._output[start:])
                return

    def _activate(self, text: str) -> None:
        """Replay ``text`` (already sampled) into the grammar, then constrain from here."""
        assert self._tokenize is not None
        for token in self._tokenize(text):
            if not self._allowed(token):
                log.debug("trigger text %r does not fit the grammar; output stays free", text)
                self._drop_grammar()
                return
            llama_cpp.llama_sampler_accept(self._grammar, token)
        self._active = True

    def _drop_grammar(self) -> None:
        if self._grammar is not None:
            llama_cpp.llama_sampler_free(self._grammar)
        self._grammar = None
        self._active = False

    def _array(self, data: np.ndarray) -> llama_cpp.llama_token_data_array:
        return llama_cpp.llama_token_data_array(
            data=data.ctypes.data_as(llama_cpp.llama_token_data_p),
            size=len(data),
            selected=-1,
            sorted=False,
        )

    def _allowed(self, token: int) -> bool:
        """Whether the grammar accepts ``token`` next (llama_sampler_apply never throws;
        accepting a refused token would abort the process)."""
        one = np.array([(token, 0.0, 0.0)], dtype=TOKEN_DATA)
        array = self._array(one)
        llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(array))
        return bool(np.isfinite(array.data[0].logit))

    def _pick(
        self, logits: np.ndarray, ids: np.ndarray | None = None, *, constrained: bool = False
    ) -> int | None:
        """The chain's pick among ``ids`` (default: the whole vocabulary), after the
        grammar when ``constrained``; None when the grammar refuses them all."""
        if ids is None and len(self._data) == len(logits):
            data, ids, chosen = self._data, self._ids, logits
        else:  # a subset, or a grammar-free sampler's one pick from saved logits
            ids = np.arange(len(logits), dtype=np.int32) if ids is None else ids
            data, chosen = np.zeros(len(ids), dtype=TOKEN_DATA), logits[ids]
        # Samplers sort the array in place: every field is written afresh each time.
        data["id"] = ids
        data["logit"] = chosen
        data["p"] = 0.0
        array = self._array(data)
        if constrained:
            llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(array))
            if not np.isfinite(data["logit"]).any():
                return None
        llama_cpp.llama_sampler_apply(self._chain.sampler, ctypes.byref(array))
        # Samplers may re-point `data` (llama.h): read the pick through the array.
        return int(array.data[array.selected].id)

    def close(self) -> None:
        self._drop_grammar()
        self._chain.close()
