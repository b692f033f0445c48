"""One llama.cpp sampler chain per sequence, built from a request's sampling settings."""

from __future__ import annotations

from llama_cpp import _internals

from server.engine.base import SamplingParams

# llama.cpp's server default for the penalty window (common/common.h, penalty_last_n).
PENALTY_LAST_N = 64


def make_sampler(params: SamplingParams, n_vocab: int) -> _internals.LlamaSampler:
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
