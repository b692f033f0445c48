"""Chat completions against the real server and the bundled Gemma 3 270M, via the SDK."""

from __future__ import annotations

import llama_cpp
import openai
import pytest

from tests.conftest import NO_EOG, gemma3_template
from tests.e2e.conftest import MODEL

MESSAGES = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "Name three colours of the rainbow."},
]


def expected_prompt_tokens(vocab: llama_cpp.Llama, messages: list[dict[str, str]]) -> list[int]:
    """Render Gemma 3's turn format independently of the server and tokenize it."""
    text = gemma3_template().render(messages, add_generation_prompt=True)
    assert text.startswith("<bos><start_of_turn>user\nYou answer in one short sentence.\n\n")
    return vocab.tokenize(text.encode(), add_bos=False, special=True)


def test_completion_returns_text_and_exact_prompt_usage(
    client: openai.OpenAI, vocab: llama_cpp.Llama
) -> None:
    completion = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0
    )
    choice = completion.choices[0]
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == MODEL
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert "<end_of_turn>" not in choice.message.content and "<eos>" not in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    tokens = expected_prompt_tokens(vocab, MESSAGES)
    assert tokens.count(2) == 1 and tokens[0] == 2  # exactly one BOS
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens == len(tokens)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert 0 < usage.completion_tokens <= 24


def test_stream_matches_non_stream_and_reports_usage(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=32, temperature=0
    )
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=32,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text == full.choices[0].message.content
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == full.choices[0].finish_reason
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.model_dump() == full.usage.model_dump()  # type: ignore[union-attr]
    assert all(c.id == chunks[0].id for c in chunks)


def test_stream_without_include_usage_sends_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0, stream=True
        )
    )
    assert all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_token_budget_ends_with_length(client: openai.OpenAI, field: str) -> None:
    completion = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        temperature=0,
        logit_bias=NO_EOG,
        **{field: 5},  # type: ignore[arg-type]
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 5


def test_stop_string_ends_text_and_is_excluded(client: openai.OpenAI) -> None:
    base = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=40, temperature=0, logit_bias=NO_EOG
    )
    text = base.choices[0].message.content or ""
    words = [w for w in text.split() if len(w) >= 4]
    assert len(words) >= 2, text
    stop = words[len(words) // 2]
    cut = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=40,
        temperature=0,
        logit_bias=NO_EOG,
        stop=[stop, "never-appears-xyz"],
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]
    streamed = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=40,
        temperature=0,
        logit_bias=NO_EOG,
        stop=stop,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text[: text.index(stop)]


def test_seed_makes_sampling_reproducible(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        completion = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Write a story about a dragon."}],
            max_tokens=24,
            temperature=0.8,
            seed=seed,
            logit_bias=NO_EOG,
        )
        return completion.choices[0].message.content or ""

    first = sample(1234)
    assert sample(1234) == first
    others = {sample(seed) for seed in (1, 2, 3)}
    assert any(other != first for other in others)
    assert len(others) > 1


def test_models_endpoint_lists_model(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model"
    extra = models.data[0].model_extra or {}
    assert extra["capabilities"] == ["completion", "tools"]
    # A start-up model: loaded, never unloaded for idleness.
    assert extra["state"] == "ready" and extra["keep_alive_s"] == -1
    assert extra["memory_bytes"] > 0 and extra["expires_at"] is None


def test_default_alias_serves_default_model(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="default", messages=MESSAGES, max_tokens=2, temperature=0
    )
    assert completion.model == MODEL


def test_unicode_round_trips(client: openai.OpenAI) -> None:
    # RTL, ZWJ emoji, CJK and a NUL byte are valid input and must not break anything.
    text = "مرحبا 👩‍👩‍👧 你好 \u0000 end"
    completion = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=8, temperature=0
    )
    assert completion.usage is not None and completion.usage.prompt_tokens > 10
    assert "\ufffd" not in (completion.choices[0].message.content or "")


def test_text_parts_and_developer_role(client: openai.OpenAI, vocab: llama_cpp.Llama) -> None:
    as_parts = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "developer", "content": [{"type": "text", "text": MESSAGES[0]["content"]}]},
            {"role": "user", "content": [{"type": "text", "text": MESSAGES[1]["content"]}]},
        ],
        max_tokens=8,
        temperature=0,
    )
    as_strings = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0
    )
    assert as_parts.usage is not None and as_strings.usage is not None
    assert as_parts.usage.prompt_tokens == as_strings.usage.prompt_tokens
    assert as_parts.choices[0].message.content == as_strings.choices[0].message.content


def test_multi_turn_conversation(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": "Hello!"},
            {"role": "assistant", "content": "Hi there."},
            {"role": "user", "content": "What did I say first?"},
        ],
        max_tokens=8,
        temperature=0,
    )
    assert completion.choices[0].message.content is not None
