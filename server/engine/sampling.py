"""One llama.cpp sampler per sequence, built from a request's sampling settings and its
optional grammar, and the log-probabilities of the tokens it picks."""

from __future__ import annotations

import ctypes
import logging
import re
from collections.abc import Callable

import llama_cpp
import numpy as np
from llama_cpp import _internals

from server.engine.base import GrammarSpec, SamplingParams, TokenLogprob

log = logging.getLogger(__name__)

# llama.cpp's server default for the penalty window (common/common.h, penalty_last_n).
PENALTY_LAST_N = 64
# llama_token_data's layout (llama.h): id, logit, p.
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class GrammarError(ValueError):
    """llama.cpp could not parse a GBNF grammar."""


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

    Args:
        params: Sampling settings.
        vocab: The model's vocabulary (for the grammar).
        n_vocab: Vocabulary size.
        grammar: Optional constraint.
        piece: Token id → its text bytes, special tokens included (for triggers).
        tokenize: Text → token ids, special tokens parsed (for the replay).

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
    ):
        self._n_vocab = n_vocab
        self._spec = grammar
        self._grammar = init_grammar(vocab, GrammarSpec(grammar.gbnf)) if grammar else None
        self._active = grammar is not None and not grammar.lazy
        self._output = ""  # text so far, searched for triggers while the grammar waits
        self._piece = piece
        self._tokenize = tokenize
        self._chain = make_chain(params, n_vocab)
        self._data = np.zeros(n_vocab if grammar is not None else 0, dtype=TOKEN_DATA)
        self._ids = np.arange(len(self._data), dtype=np.int32)

    def sample(self, ctx: _internals.LlamaContext, index: int) -> int:
        """Pick (and accept) the next token from batch row ``index``."""
        if not self._active:
            token = self._chain.sample(ctx, index)  # samples and accepts, all in C
            if self._grammar is not None:
                self._watch(token)
            return token
        logits = logits_row(ctx, index, self._n_vocab)
        token = self._pick(logits, constrained=False)
        if not self._allowed(token):
            token = self._pick(logits, constrained=True)
            if not self._allowed(token):  # a dead end: never accept what the grammar refuses
                log.error("grammar refused every token; output continues unconstrained")
                self._drop_grammar()
                self._chain.accept(token)
                return token
        llama_cpp.llama_sampler_accept(self._grammar, token)
        self._chain.accept(token)
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

    def _pick(self, logits: np.ndarray, *, constrained: bool) -> int:
        data = self._data
        # Samplers sort the array in place: every field is written afresh each time.
        data["id"] = self._ids
        data["logit"] = logits
        data["p"] = 0.0
        array = self._array(data)
        if constrained:
            llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(array))
        llama_cpp.llama_sampler_apply(self._chain.sampler, ctypes.byref(array))
        # Samplers may re-point `data` (llama.h): read the pick through the array.
        return int(array.data[array.selected].id)

    def close(self) -> None:
        self._drop_grammar()
        self._chain.close()
