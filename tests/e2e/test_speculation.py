"""Speculative decoding through the real server: on by default, ``speculative: false``
turns it off per request without changing greedy output, and /metrics counts drafted and
accepted tokens."""

from __future__ import annotations

import re

import httpx
import openai

from tests.bench.copy_heavy import COPY_REQUEST
from tests.conftest import RunningServer
from tests.e2e.conftest import MODEL


def spec_metrics(server: RunningServer, model: str = MODEL) -> tuple[float, float]:
    text = httpx.get(f"{server.base_url}/metrics", headers=server.headers()).text
    found = []
    for name in ("ggufserve_spec_drafted_tokens_total", "ggufserve_spec_accepted_tokens_total"):
        match = re.search(rf'^{name}{{model="{model}"}} (\S+)$', text, re.MULTILINE)
        assert match, name
        found.append(float(match.group(1)))
    return found[0], found[1]


def rewrite(client: openai.OpenAI, **extra: object) -> str:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": COPY_REQUEST}],
        max_tokens=40,
        temperature=0,
        extra_body=extra or None,
    )
    return reply.choices[0].message.content or ""


def test_speculation_is_on_by_default_and_off_per_request(
    client: openai.OpenAI, server: RunningServer
) -> None:
    start = spec_metrics(server)
    off = rewrite(client, speculative=False)
    assert spec_metrics(server) == start
    on = rewrite(client)
    drafted, accepted = spec_metrics(server)
    assert accepted > start[1] and drafted >= accepted
    assert on == off
