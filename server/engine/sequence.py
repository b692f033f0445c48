"""The state of one llama.cpp sequence (``seq_id``) and of the generation running on it."""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ggufserve.engine.base import TokenLogprob
from ggufserve.engine.sampling import TokenSampler
from ggufserve.engine.speculative import Drafter
from ggufserve.engine.text import StopScanner
from ggufserve.engine.worker import Generation

# Stands in the cached-token list for a row that holds an image embedding: never equal to
# a prompt token, so prefix reuse stops before any image.
IMAGE_ROW = -1


@dataclass
class ImagePiece:
    """An mtmd image chunk of a prompt, and its embedding once encoded (off the owner
    thread): ``embedding`` resolves to an (n_tokens × n_embd_inp) float32 array."""

    chunk: Any
    n_tokens: int
    embedding: Future[np.ndarray]


Piece = list[int] | ImagePiece


class ImageDecodeError(RuntimeError):
    """llama.cpp could not decode an image's rows; ``status`` is ``llama_decode``'s (1: no
    free KV cells for them)."""

    def __init__(self, status: int):
        super().__init__(f"mtmd could not decode an image chunk ({status})")
        self.status = status


@dataclass(eq=False)
class Running:
    """A generation admitted to a sequence.

    Attributes:
        generation: The handle events go to.
        pieces: Prompt left to decode: token lists (split into chunks by the scheduler)
            and images (each decoded alone).
        n_prompt: Prompt size in KV cells (text tokens + image tokens).
        n_cached: Prompt cells reused from the KV cache (not decoded again).
        next_token: The last sampled token, decoded in the next step; None while the
            prompt is still being decoded.
        logprobs: Logprobs of sampled tokens whose text the scanner still holds.
        prompt_logprobs: Logprobs of the prompt tokens decoded so far (when requested).
        drafter: Draft tokens for this generation: prompt lookup or a draft model (None:
            no speculation).
        draft: The draft tokens decoded after ``next_token`` in the current step.
        keeps_logits: The prompt is one text piece: the logits after it are kept on the
            slot for a repeat (``Slot.prompt_logits``).
    """

    generation: Generation
    pieces: deque[Piece]
    sampler: TokenSampler
    scanner: StopScanner
    n_prompt: int
    n_cached: int
    admitted_at: float = field(default_factory=time.monotonic)
    next_token: int | None = None
    completion_tokens: int = 0
    first_token_at: float | None = None
    # Keeps mtmd's chunks (and so the ImagePiece pointers) alive while decoding.
    media: Any = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    drafter: Drafter | None = None
    draft: list[int] = field(default_factory=list)
    keeps_logits: bool = False

    @property
    def max_tokens(self) -> int:
        return self.generation.request.max_tokens

    @property
    def submitted_at(self) -> float:
        return self.generation.submitted_at


@dataclass(eq=False)  # identity: `slot in free` must not compare whole caches
class Slot:
    """One ``seq_id`` of the context and what its KV cells hold.

    Attributes:
        cached: Token ids in the KV cache for this sequence, in position order
            (``IMAGE_ROW`` for image rows); what prefix reuse compares against.
        n_past: Next position. Equals ``len(cached)`` except after a Qwen3-VL image,
            whose M-RoPE positions advance by the image's ``n_pos``, not its rows.
        running: The generation on it, or None when idle (its cache kept for reuse).
        last_used: When it last finished (monotonic seconds), for picking which idle
            cache to drop first.
        prompt_logits: The logits row (float32, (n_vocab,)) that followed the last text
            prompt decoded here, i.e. ``cached[:prompt_logits_at]``: a repeat of that
            prompt samples its first token from it instead of decoding again. Never
            written to (choices of one request share it).
        prompt_logits_at: How many cached tokens ``prompt_logits`` follows (0: none).
    """

    seq_id: int
    cached: list[int] = field(default_factory=list)
    n_past: int = 0
    running: Running | None = None
    last_used: float = 0.0
    prompt_logits: np.ndarray | None = None
    prompt_logits_at: int = 0

    def forget(self, keep: int = 0) -> None:
        """Bookkeeping for dropping the cells at positions >= ``keep`` (text-only prefix)."""
        del self.cached[keep:]
        self.n_past = keep
        if keep < self.prompt_logits_at:
            self.keep_logits(None, 0)

    def keep_logits(self, logits: np.ndarray | None, at: int) -> None:
        """Note the logits that follow ``cached[:at]`` (None: forget them)."""
        self.prompt_logits, self.prompt_logits_at = logits, at

    def logits_after(self, n_prompt: int, shared: int) -> np.ndarray | None:
        """The kept logits when they follow exactly a prompt of ``n_prompt`` tokens that
        shares its first ``shared`` tokens with ``cached`` (all its cells cached here)."""
        at = self.prompt_logits_at
        return self.prompt_logits if at == n_prompt and shared >= at > 0 else None


def common_prefix(cached: list[int], prompt: list[int]) -> int:
    """Length of the shared leading run of ``cached`` and ``prompt``."""
    n = 0
    for a, b in zip(cached, prompt, strict=False):
        if a != b:
            break
        n += 1
    return n
