"""Two scheduler measurements on our server (``make bench``):

- inter-token latency (ITL) of 3 running streams before and while a ~4k-token prompt
  arrives (chunked prefill should slow their steps, not stall them);
- two models in one server generating at once vs one alone (they share the cores).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import GEMMA3_EOG_IDS, model_entry, start_server

BAN_EOG = {str(t): -100 for t in GEMMA3_EOG_IDS}


async def token_times(
    client: httpx.AsyncClient, url: str, model: str, prompt: str, n: int
) -> list[float]:
    """perf_counter() of every content chunk of one greedy stream."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": n,
            "temperature": 0, "logit_bias": BAN_EOG, "stream": True}  # fmt: skip
    times = []
    async with client.stream("POST", url, json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    times.append(time.perf_counter())
    return times


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


@dataclass
class PrefillStall:
    long_prompt_tokens: int
    itl_p95_before_ms: float
    itl_p95_during_ms: float
    itl_max_during_ms: float
    long_prompt_ttft_s: float


def prefill_stall(model: Path, threads: int, tmp: Path) -> PrefillStall:
    entry = model_entry("bench", model, n_ctx=8192, n_threads=threads, n_parallel=4)
    server = start_server(tmp / "stall", [entry], api_key=None)
    url = f"{server.base_url}/v1/chat/completions"
    long_prompt = "Summarise this text. " + "The committee met again and agreed on nothing. " * 400

    async def run() -> tuple[list[list[float]], float, float, int]:
        async with httpx.AsyncClient(timeout=600) as client:
            streams = [asyncio.create_task(token_times(client, url, "bench", f"Story {i}", 400))
                       for i in range(3)]  # fmt: skip
            await asyncio.sleep(4.0)
            sent = time.perf_counter()
            body = {"model": "bench", "messages": [{"role": "user", "content": long_prompt}],
                    "max_tokens": 1}  # fmt: skip
            reply = (await client.post(url, json=body)).json()
            done = time.perf_counter()
            return list(await asyncio.gather(*streams)), sent, done, reply["usage"]["prompt_tokens"]

    try:
        streams, sent, done, n_prompt = asyncio.run(run())
    finally:
        server.stop()
    before, during = [], []
    for times in streams:
        for a, b in itertools.pairwise(times):
            (during if sent <= b <= done else before if b < sent else []).append(1000 * (b - a))
    return PrefillStall(n_prompt, p95(before), p95(during), max(during), done - sent)


@dataclass
class TwoModels:
    alone_tok_s: float
    together_tok_s: float

    @property
    def ratio(self) -> float:
        return self.together_tok_s / self.alone_tok_s


def two_models(model: Path, threads: int, tmp: Path) -> TwoModels:
    entries = [model_entry(name, model, n_ctx=2048, n_threads=threads) for name in ("a", "b")]
    server = start_server(tmp / "two", entries, api_key=None)
    url = f"{server.base_url}/v1/chat/completions"

    async def rate(models: list[str]) -> float:
        async with httpx.AsyncClient(timeout=600) as client:
            started = time.perf_counter()
            runs = await asyncio.gather(
                *(token_times(client, url, m, "Tell me a long story.", 128) for m in models)
            )
            return sum(len(t) for t in runs) / (time.perf_counter() - started)

    try:
        asyncio.run(rate(["a", "b"]))  # warm-up
        alone = asyncio.run(rate(["a"]))
        together = asyncio.run(rate(["a", "b"]))
    finally:
        server.stop()
    return TwoModels(alone, together)


def report(stall: PrefillStall, pair: TwoModels) -> str:
    return "\n".join([
        f"3 running streams while a {stall.long_prompt_tokens}-token prompt arrives: ITL p95 "
        f"{stall.itl_p95_before_ms:.0f} ms before, {stall.itl_p95_during_ms:.0f} ms during "
        f"(max {stall.itl_max_during_ms:.0f} ms); the long prompt's answer took "
        f"{stall.long_prompt_ttft_s:.1f} s",
        f"two models at once: {pair.together_tok_s:.1f} tok/s in all vs {pair.alone_tok_s:.1f} "
        f"alone ({pair.ratio:.2f}x)",
    ])  # fmt: skip
