"""The same GGUF on the device and on the CPU (``tests.gpu.parity``): greedy tokens,
logprobs and image embeddings.

Tokens: identical for all 32 steps, or up to a step where the CPU's own top-2 margin is
within twice the largest logit difference measured (a near tie that kernel rounding can
flip; the figures name the step and margin). Logprob bounds, in nats, are priors until a
GPU run measures them (docs/gpu.md); the figures are written either way.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from tests.gpu.models import SPEED, TINY_MM, TINY_TEXT
from tests.gpu.parity import N_TOKENS, compare_embeddings, compare_tokens

pytestmark = pytest.mark.gpu
# |Δ log p| of the CPU's token and of its top-10, in nats: F32 weights vs Q4_K_M (where the
# CPU quantizes activations to Q8_K and CUDA to Q8_1 before the dot products).
LOGPROB_BOUND = {TINY_TEXT: 0.02, SPEED: 0.2}
MIN_COSINE = 0.999


@pytest.mark.parametrize("name", [TINY_TEXT, SPEED])
def test_greedy_tokens_and_logprobs(
    name: str, gpu_models: dict[str, dict[str, Any]], logs: Path, figures: dict[str, Any]
) -> None:
    result = compare_tokens(Path(gpu_models[name]["gguf"]), logs / f"parity-{name}.log")
    figures.update(model=name, bound_nats=LOGPROB_BOUND[name], **asdict(result))
    if result.identical < N_TOKENS:
        assert result.margin_at_divergence is not None
        assert result.margin_at_divergence <= 2 * result.max_abs_logit, (
            f"step {result.identical} differs where the CPU's choice is clear"
        )
    assert result.max_chosen_logprob <= LOGPROB_BOUND[name]
    assert result.max_topk_logprob <= LOGPROB_BOUND[name]


def test_image_embeddings(
    gpu_models: dict[str, dict[str, Any]], logs: Path, figures: dict[str, Any]
) -> None:
    entry = gpu_models[TINY_MM]
    result = compare_embeddings(Path(entry["gguf"]), Path(entry["mmproj"]), logs / "parity-mm.log")
    figures.update(model=TINY_MM, min_cosine=MIN_COSINE, **asdict(result))
    assert result.shape[0] > 0
    assert result.min_row_cosine >= MIN_COSINE
