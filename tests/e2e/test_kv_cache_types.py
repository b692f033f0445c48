"""``cache_type_k`` / ``cache_type_v`` through models.yaml and the real server: a q8_0-cache
model answers, and ``/v1/models`` reports its smaller memory estimate."""

from __future__ import annotations

from pathlib import Path

import httpx

from ggufserve.models.memory import kv_bytes_per_token
from tests.conftest import model_entry, start_server

N_CTX = 2048


def test_a_q8_0_cache_model_serves_and_is_budgeted_smaller(
    bundled_gguf: Path, tmp_path: Path
) -> None:
    entries = [
        model_entry("f16-cache", bundled_gguf, n_ctx=N_CTX),
        model_entry(
            "q8-cache", bundled_gguf, n_ctx=N_CTX, cache_type_k="q8_0", cache_type_v="q8_0"
        ),
    ]
    server = start_server(tmp_path, entries)
    try:
        with httpx.Client(base_url=server.v1, headers=server.headers(), timeout=60) as http:
            body = {
                "model": "q8-cache",
                "messages": [{"role": "user", "content": "Name a colour."}],
                "max_tokens": 8,
                "temperature": 0,
            }
            reply = http.post("/chat/completions", json=body)
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["message"]["content"]
            cards = {card["id"]: card for card in http.get("/models").json()["data"]}
    finally:
        server.stop()
    saved = N_CTX * (
        kv_bytes_per_token(bundled_gguf) - kv_bytes_per_token(bundled_gguf, "q8_0", "q8_0")
    )
    assert saved == N_CTX * 18 * 512 * (2 - 34 / 32)
    assert cards["f16-cache"]["memory_bytes"] - cards["q8-cache"]["memory_bytes"] == saved
