"""Throughput of the in-process Python API on the bundled model: 8 calls in a row vs 8
threads at once vs 8 concurrent OpenAI SDK clients of the HTTP server on the same model
(64 greedy tokens each, end of generation banned). Run under the CPU lock:
``flock /tmp/ggufserve-cpu.lock .venv/bin/python -m tests.bench.python_api``."""

from __future__ import annotations

import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

import ggufserve
from ggufserve.cli.run import local_server
from ggufserve.settings import ServerSettings
from tests.conftest import NO_EOG, bundled_gguf

TOKENS = 64
PROMPTS = [f"Write a short story about a {animal}." for animal in
           ("cat", "dog", "fox", "owl", "bee", "eel", "yak", "ant")]  # fmt: skip
ARGS = {"max_tokens": TOKENS, "temperature": 0, "logit_bias": NO_EOG}


def timed(label: str, run: object) -> float:
    started = time.monotonic()
    run()  # type: ignore[operator]
    seconds = time.monotonic() - started
    print(f"{label:<28} {seconds:6.2f} s  {len(PROMPTS) * TOKENS / seconds:6.1f} tok/s")
    return seconds


def main() -> None:
    gguf = bundled_gguf.__wrapped__()  # type: ignore[attr-defined]
    home = Path(tempfile.mkdtemp())
    with ggufserve.load(gguf, home=home, n_ctx=4096, n_parallel=8) as model:
        model.chat("warm up", max_tokens=4)

        def one(prompt: str) -> None:
            model.chat(prompt, **ARGS)

        timed("python, 8 in a row", lambda: [one(p) for p in PROMPTS])
        with ThreadPoolExecutor(8) as pool:
            timed("python, 8 threads", lambda: list(pool.map(one, PROMPTS)))
        entry = model.entry
    with local_server(entry, ServerSettings()) as base_url:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0)

        def http(prompt: str) -> None:
            client.chat.completions.create(
                model=entry.id, messages=[{"role": "user", "content": prompt}], **ARGS
            )

        http("warm up")
        with ThreadPoolExecutor(8) as pool:
            timed("http, 8 SDK clients at once", lambda: list(pool.map(http, PROMPTS)))


if __name__ == "__main__":
    main()
