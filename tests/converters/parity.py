"""The parity rule between llama.cpp and transformers logits (CONVERTER_NOTES.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import llama_cpp
import numpy as np

MARGIN = 1e-3  # top-1 is compared only where the reference's top-2 margin exceeds this


@dataclass
class Parity:
    max_abs: float
    logit_range: float
    top1_agree: float  # fraction of positions with a clear reference top-1
    positions: int

    @property
    def relative(self) -> float:
        return self.max_abs / self.logit_range


def reference_logits(model: Any, ids: list[int]) -> np.ndarray:
    """(n_tokens, n_vocab) float32 logits of a transformers model for ``ids`` (no grad)."""
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def llama_logits(model_path: str, token_ids: list[int], *, f32_kv: bool = True) -> np.ndarray:
    """(n_tokens, n_vocab) logits from llama.cpp for every position."""
    kv = {"type_k": 0, "type_v": 0} if f32_kv else {}  # GGML_TYPE_F32
    llama = llama_cpp.Llama(model_path, n_ctx=512, logits_all=True, verbose=False, **kv)
    try:
        llama.eval(token_ids)
        return np.array(llama.scores[: len(token_ids)], dtype=np.float32)
    finally:
        llama.close()


def compare(reference: np.ndarray, got: np.ndarray) -> Parity:
    top2 = np.sort(reference, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > MARGIN
    agree = reference.argmax(-1) == got.argmax(-1)
    return Parity(
        max_abs=float(np.abs(reference - got).max()),
        logit_range=float(reference.max() - reference.min()),
        top1_agree=float(agree[clear].mean()) if clear.any() else 1.0,
        positions=int(clear.sum()),
    )
