"""The greedy sampler's numpy argmax (logit bias, no penalties) picks what llama.cpp's
logit-bias + greedy chain picks over the whole vocabulary, ties and biases included, from
a kept logits row as from a batch row."""

from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np
import pytest

from ggufserve.engine.base import SamplingParams
from ggufserve.engine.sampling import TOKEN_DATA, TokenSampler, make_chain

N_VOCAB = 4096


def chain_pick(params: SamplingParams, logits: np.ndarray) -> int:
    """llama.cpp's own chain applied to every token (llama_sampler_sample's steps)."""
    chain = make_chain(params, len(logits))
    data = np.zeros(len(logits), dtype=TOKEN_DATA)
    data["id"] = np.arange(len(logits))
    data["logit"] = logits
    array = llama_cpp.llama_token_data_array(
        data=data.ctypes.data_as(llama_cpp.llama_token_data_p),
        size=len(data),
        selected=-1,
        sorted=False,
    )
    llama_cpp.llama_sampler_apply(chain.sampler, ctypes.byref(array))
    token = int(array.data[array.selected].id)
    chain.close()
    return token


@pytest.mark.parametrize("seed", range(40))
def test_the_argmax_pick_is_the_chains(seed: int) -> None:
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal(N_VOCAB).astype(np.float32)
    tied = rng.integers(0, N_VOCAB, 3)
    logits[tied] = logits.max()  # several maxima: the first in id order wins
    tokens = rng.integers(0, N_VOCAB, 6)
    bias = {int(t): float(b) for t, b in zip(tokens, rng.normal(0, 2, 6), strict=True)}
    if seed % 4 == 0:
        bias[int(tied.min())] = -100.0  # a banned maximum
    if seed % 4 == 1:
        bias = {}
    params = SamplingParams(0.0, 1.0, 0, 0.0, 0.0, 0.0, 1.0, 0, logit_bias=bias)
    sampler = TokenSampler(params, None, N_VOCAB)  # type: ignore[arg-type]  # no grammar
    kept = logits.copy()
    assert sampler.sample(None, 0, saved=kept) == chain_pick(params, logits)  # type: ignore[arg-type]
    assert np.array_equal(kept, logits)  # the kept row is read, never written
    sampler.close()
