"""A request's sampling fields over the model's defaults (chat and text completions)."""

from __future__ import annotations

import secrets
from typing import Any

from ggufserve.api.wire import ChatCompletionRequest, CompletionRequest
from ggufserve.engine.base import SamplingParams
from ggufserve.errors import InvalidRequestError
from ggufserve.settings import SamplingDefaults

# llama.cpp treats seed 0xFFFFFFFF as "pick a random seed" (LLAMA_DEFAULT_SEED).
SEED_MODULUS = 2**32 - 1


def sampling_params(
    body: ChatCompletionRequest | CompletionRequest,
    defaults: SamplingDefaults,
    n_vocab: int,
    n_choices: int = 1,
) -> list[SamplingParams]:
    """One :class:`SamplingParams` per choice: request values over the model's defaults
    (its entry's ``sampling``), a random seed unless one is given; choice ``i`` uses
    seed + ``i`` so that the ``n`` choices of a seeded request differ from each other and
    are reproducible. ``n_vocab``: the model's vocabulary size.

    Raises:
        InvalidRequestError: a ``logit_bias`` token id is outside the vocabulary.
    """
    bias: dict[int, float] = {}
    for key, value in (body.logit_bias or {}).items():
        token = int(key)
        if token >= n_vocab:
            raise InvalidRequestError(
                f"logit_bias token id {token} is outside the vocabulary (size {n_vocab}).",
                param="logit_bias",
            )
        bias[token] = value
    seed = secrets.randbelow(SEED_MODULUS) if body.seed is None else body.seed % SEED_MODULUS

    def pick(name: str) -> Any:
        value = getattr(body, name)
        return getattr(defaults, name) if value is None else value

    return [
        SamplingParams(
            temperature=pick("temperature"),
            top_p=pick("top_p"),
            top_k=pick("top_k"),
            min_p=pick("min_p"),
            presence_penalty=pick("presence_penalty"),
            frequency_penalty=pick("frequency_penalty"),
            repeat_penalty=pick("repeat_penalty"),
            seed=(seed + i) % SEED_MODULUS,
            logit_bias=bias,
        )
        for i in range(n_choices)
    ]
