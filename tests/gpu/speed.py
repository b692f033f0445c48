"""Speed on one card, one GGUF (the 1B-shaped Q4_K_M): llama-bench tg128 / pp512, then
llama-server with 8 slots and ours with 8 sequences at 1, 8 and 32 concurrent streams
(greedy, streaming, end-of-generation banned so each stream is ``--max-tokens`` long).

Both servers use the same threads, context and unified KV; rounds interleave the systems.
c=1 is :data:`tests.bench.run.SOLO_REQUESTS` requests one after another. Targets (issue
23): ours at c=1 ≥ 0.95 × llama-bench tg; ours at c ≥ 8 ≥ 1.0 × llama-server's aggregate.
Writes ``--out`` (JSON) and prints a table; a system whose binary is missing (the CPU dry
run compiles nothing) is left out and said so.

``python -m tests.gpu.speed --model GGUF --out FILE [--llama-server BIN --llama-bench BIN]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from itertools import cycle, islice
from pathlib import Path

import httpx

from tests.bench import peers
from tests.bench.latency import percentile
from tests.bench.run import PROMPTS, SOLO_REQUESTS, Run, stream_one
from tests.conftest import free_port, model_entry, start_server

LEVELS = (1, 8, 32)
SLOTS = 8
N_CTX = 4096
TARGET_C1 = 0.95
TARGET_BATCHED = 1.0


@dataclass
class Row:
    system: str
    clients: int
    aggregate_tok_s: float
    stream_tok_s: float
    ttft_p50_ms: float
    completed: int
    cut_short: int


def llama_bench(binary: Path, model: Path, threads: int, device: bool) -> dict[str, float]:
    """tg128 and pp512 tok/s (mean of 3 runs each) from llama-bench's JSON."""
    command = [str(binary), "-m", str(model), "-p", "512", "-n", "128", "-r", "3"]
    command += ["-t", str(threads), "-ngl", "99" if device else "0", "-o", "json"]
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=300)
    out = {}
    for test in json.loads(done.stdout):
        key = f"tg{test['n_gen']}" if test["n_gen"] else f"pp{test['n_prompt']}"
        out[key] = float(test["avg_ts"])
    return out


class Endpoint:
    """One server; ``wave(n)`` runs n streams at once (n=1: SOLO_REQUESTS in turn)."""

    def __init__(self, name: str, base_url: str, stop: Callable[[], object], max_tokens: int):
        self.name, self._stop, self._max_tokens = name, stop, max_tokens
        self._url = f"{base_url}/v1/chat/completions"
        asyncio.run(self._gather(PROMPTS[:1], 4))  # warm-up

    async def _gather(self, prompts: list[str], max_tokens: int) -> list[Run]:
        async with httpx.AsyncClient(timeout=600) as client:
            started = time.perf_counter()
            runs = (stream_one(client, self._url, p, max_tokens, started) for p in prompts)
            return list(await asyncio.gather(*runs))

    def wave(self, clients: int) -> tuple[list[Run], float]:
        started = time.perf_counter()
        if clients == 1:
            solo = PROMPTS[:SOLO_REQUESTS]
            runs = [asyncio.run(self._gather([p], self._max_tokens))[0] for p in solo]
        else:
            prompts = list(islice(cycle(PROMPTS), clients))
            runs = asyncio.run(self._gather(prompts, self._max_tokens))
        return runs, time.perf_counter() - started

    def close(self) -> None:
        self._stop()


def measure(endpoints: list[Endpoint], rounds: int) -> list[Row]:
    runs: dict[tuple[str, int], list[Run]] = {}
    walls: dict[tuple[str, int], float] = {}
    for _ in range(rounds):
        for endpoint in endpoints:
            for clients in LEVELS:
                batch, wall = endpoint.wave(clients)
                runs.setdefault((endpoint.name, clients), []).extend(batch)
                walls[endpoint.name, clients] = walls.get((endpoint.name, clients), 0.0) + wall
    rows = []
    for (name, clients), batch in runs.items():
        completed = sum(r.finished for r in batch)
        rows.append(
            Row(
                system=name,
                clients=clients,
                aggregate_tok_s=sum(r.tokens for r in batch) / walls[name, clients],
                stream_tok_s=statistics.median(r.tok_per_s for r in batch),
                ttft_p50_ms=percentile([1000 * r.ttft_s for r in batch], 0.5),
                completed=completed,
                cut_short=len(batch) - completed,
            )
        )
    return rows


def ratios(rows: list[Row], bench: dict[str, float]) -> dict[str, float]:
    """Ours against the targets' references (only those measured)."""
    ours = {r.clients: r for r in rows if r.system == "ggufserve"}
    theirs = {r.clients: r for r in rows if r.system == "llama-server"}
    out = {}
    if "tg128" in bench and 1 in ours:
        out["ours_c1_stream_over_llama_bench_tg128"] = ours[1].stream_tok_s / bench["tg128"]
    for c in LEVELS[1:]:
        if c in ours and c in theirs and theirs[c].aggregate_tok_s:
            out[f"ours_over_llama_server_aggregate_c{c}"] = (
                ours[c].aggregate_tok_s / theirs[c].aggregate_tok_s
            )
    return out


def table(rows: list[Row], bench: dict[str, float], found: dict[str, float]) -> str:
    lines = [f"llama-bench: {json.dumps(bench)}", ""]
    lines += ["| system | c | aggregate tok/s | stream tok/s | TTFT p50 ms | done | cut |"]
    lines += ["|---|---|---|---|---|---|---|"]
    lines += [
        f"| {r.system} | {r.clients} | {r.aggregate_tok_s:.1f} | {r.stream_tok_s:.1f} "
        f"| {r.ttft_p50_ms:.0f} | {r.completed} | {r.cut_short} |"
        for r in sorted(rows, key=lambda r: (r.clients, r.system))
    ]
    lines += ["", *(f"{k}: {v:.3f}" for k, v in found.items())]
    return "\n".join(lines)


def start(args: argparse.Namespace, logs: Path) -> list[Endpoint]:
    threads = os.cpu_count() or 1
    endpoints = []
    if args.llama_server and args.llama_server.is_file():
        port = free_port()
        command = peers.llama_server_args(
            args.llama_server.parent, args.model, threads, N_CTX, SLOTS, port
        )
        command[0] = str(args.llama_server)
        command += ["-ngl", "99" if args.device else "0"]
        base_url, stop = peers.spawn(command, logs / "speed-llama-server.log", "/health", port)
        endpoints.append(Endpoint("llama-server", base_url, stop, args.max_tokens))
    entry = model_entry("bench", args.model, n_ctx=N_CTX, n_parallel=SLOTS, n_threads=threads)
    # c=32 queues 24 requests behind the 8 sequences; the default queue bound is 16.
    ours = start_server(
        logs / "speed-ours", [entry], api_key=None, env={"GGUFSERVE_MAX_QUEUED_REQUESTS": "64"}
    )
    endpoints.append(Endpoint("ggufserve", ours.base_url, ours.stop, args.max_tokens))
    return endpoints


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--logs", type=Path, required=True)
    parser.add_argument("--llama-server", type=Path)
    parser.add_argument("--llama-bench", type=Path)
    parser.add_argument("--device", action="store_true", help="offload every layer (-ngl 99)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    args.logs.mkdir(parents=True, exist_ok=True)
    bench: dict[str, float] = {}
    if args.llama_bench and args.llama_bench.is_file():
        bench = llama_bench(args.llama_bench, args.model, os.cpu_count() or 1, args.device)
    endpoints = start(args, args.logs)
    try:
        rows = measure(endpoints, args.rounds)
    finally:
        for endpoint in endpoints:
            endpoint.close()
    found = ratios(rows, bench)
    missing = [
        name
        for name, path in (("llama-bench", args.llama_bench), ("llama-server", args.llama_server))
        if not (path and path.is_file())
    ]
    report = {
        "model": str(args.model),
        "settings": {"slots": SLOTS, "n_ctx": N_CTX, "max_tokens": args.max_tokens,
                     "rounds": args.rounds, "levels": LEVELS, "threads": os.cpu_count()},
        "not_built": missing,
        "llama_bench": bench,
        "rows": [asdict(r) for r in rows],
        "ratios": found,
        "targets": {"c1_over_tg": TARGET_C1, "batched_over_llama_server": TARGET_BATCHED},
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(table(rows, bench, found))
    if missing:
        print(f"not measured (no binary): {', '.join(missing)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
