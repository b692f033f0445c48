"""What the chat service needs from an inference engine, independent of llama.cpp."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

FinishReason = Literal["stop", "length"]


class ModelLoadError(Exception):
    """llama.cpp could not load the GGUF file or its mmproj (missing, corrupt, unsupported)."""


@dataclass(frozen=True)
class SamplingParams:
    """Resolved sampling settings for one request (request values over model defaults).

    ``temperature`` 0 means greedy. ``top_k`` 0 disables top-k. ``seed`` is a llama.cpp
    sampler seed in [0, 2**32 - 2] (2**32 - 1 is llama.cpp's "random" sentinel).
    ``logit_bias`` maps token id → additive bias.
    """

    temperature: float
    top_p: float
    top_k: int
    min_p: float
    presence_penalty: float
    frequency_penalty: float
    repeat_penalty: float
    seed: int
    logit_bias: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class GrammarSpec:
    """A llama.cpp GBNF grammar that constrains sampling (root rule ``root``).

    With ``trigger_patterns`` or ``trigger_tokens`` the grammar is lazy (as llama.cpp's
    ``llama_sampler_init_grammar_lazy_patterns``): output is free until a pattern matches
    (Python regex search over the generated text; the grammar applies from the first
    non-empty capture group) or a trigger token is sampled. See ``TokenSampler``.
    """

    gbnf: str
    trigger_patterns: tuple[str, ...] = ()
    trigger_tokens: tuple[int, ...] = ()

    @property
    def lazy(self) -> bool:
        return bool(self.trigger_patterns or self.trigger_tokens)


@dataclass(frozen=True)
class GenerationRequest:
    """One completion job: prompt token ids (BOS included), a token budget, sampling, stops.

    ``max_tokens`` counts generated tokens (0: score the prompt only, with
    ``prompt_logprobs``); the caller has checked that ``len(prompt_tokens) + max_tokens
    <= n_ctx``. ``logprobs``: None for none, else how many alternatives (0-20) to report
    with each generated token. ``prompt_logprobs``: the same for prompt tokens (the prompt
    is then decoded in full, without prefix reuse). ``speculative`` False turns the
    engine's prompt-lookup speculation off for this job (output is the same either way).
    """

    prompt_tokens: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: list[str] = field(default_factory=list)
    # With images: the engine's tokenized text + image chunks (prompt_tokens is then empty).
    media: Any = None
    grammar: GrammarSpec | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    speculative: bool = True


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability under the model (natural log of the softmax of the
    raw logits row that predicted it) and the ``top`` most likely tokens there, best
    first, as (token bytes, logprob). ``logprob`` is None for a prompt's first token."""

    token: int
    piece: bytes
    logprob: float | None
    top: tuple[tuple[bytes, float], ...] = ()


@dataclass(frozen=True)
class TextDelta:
    """New completion text, always whole UTF-8 characters, never part of a stop string;
    ``logprobs`` of the tokens whose text it completes (when requested)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class PromptLogprobs:
    """The prompt's tokens with their logprobs (requests with ``prompt_logprobs``), sent
    before any text."""

    tokens: tuple[TokenLogprob, ...]


@dataclass(frozen=True)
class Finished:
    """The last event of a generation. ``cached_tokens``: prompt tokens served from the KV
    cache (prefix reuse) rather than decoded; ``stop_sequence``: the request's stop string
    that ended it (None: it ended otherwise)."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    stop_sequence: str | None = None


@dataclass(frozen=True)
class Failed:
    """The generation broke inside the engine; details are in the server log only.
    ``code`` names a cause the client may act on (``kv_cache_full``: retry later)."""

    code: str | None = None


GenerationEvent = TextDelta | PromptLogprobs | Finished | Failed


@dataclass(frozen=True)
class ModelInfo:
    """Facts about a loaded model that prompt building and validation need.

    Attributes:
        architecture: llama.cpp ``general.architecture`` (e.g. ``gemma3``).
        n_ctx: Context size of the serving context, in tokens.
        n_vocab: Vocabulary size (valid token ids are ``0 .. n_vocab - 1``).
        bos_token / eos_token: Token texts, as chat templates expect them.
        bos_token_id: Id of BOS.
        add_bos: Whether the model wants a BOS at the start of every prompt.
        chat_template: The GGUF's ``tokenizer.chat_template``, if any.
        vision: Whether an mmproj is loaded (image input accepted).
        max_token_chars: The longest token text, in characters (byte tokens count one):
            no prompt longer than ``n_ctx * max_token_chars`` characters can fit.
    """

    architecture: str
    n_ctx: int
    n_vocab: int
    bos_token: str
    eos_token: str
    bos_token_id: int
    add_bos: bool
    chat_template: str | None
    vision: bool = False
    max_token_chars: int = 1


# Upper bounds of the latency histograms, seconds.
LATENCY_BUCKETS_S = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Histogram:
    """Cumulative-bucket counts of observations (Prometheus layout), bounds in seconds."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS_S
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    total: float = 0.0

    def observe(self, value_s: float) -> None:
        index = next((i for i, b in enumerate(self.bounds) if value_s <= b), len(self.bounds))
        self.counts[index] += 1
        self.total += value_s

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound as text, observations at or below it), ending with ``+Inf``."""
        out, running = [], 0
        for bound, count in zip([*map(str, self.bounds), "+Inf"], self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


@dataclass
class EngineStats:
    """Counters since load, written by the engine's threads (read anywhere)."""

    requests_finished: int = 0
    requests_cancelled: int = 0
    prompt_tokens: int = 0
    prompt_tokens_reused: int = 0
    generated_tokens: int = 0
    image_encodes: int = 0
    image_cache_hits: int = 0
    # Speculation: draft tokens decoded for verification, and those the sampler kept.
    spec_drafted_tokens: int = 0
    spec_accepted_tokens: int = 0
    # From submission to admission on a sequence, and to the first token.
    queue_seconds: Histogram = field(default_factory=Histogram)
    ttft_seconds: Histogram = field(default_factory=Histogram)


class Engine(Protocol):
    """An inference engine for one model; owns its threads and KV cache."""

    info: ModelInfo
    stats: EngineStats

    def tokenize(self, text: str, restore: Mapping[str, str] | None = None) -> list[int]:
        """Tokenize prompt text with special tokens parsed and no BOS added; placeholders
        in ``restore`` become their spellings as plain text (``SpecialTokens.plan``)."""
        ...

    def queue_depth(self) -> int:
        """Jobs waiting or running."""
        ...

    def close(self) -> None:
        """Cancel pending work and free the model."""
        ...
