"""logprobs, ``n`` and ``/v1/completions`` on the bundled Gemma 3 270M: the server's
logprobs equal the log-softmax of the logits an in-process llama.cpp computes for the
same tokens."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import llama_cpp
import numpy as np
import openai
import pytest

from tests.e2e.conftest import MODEL

TEXT = "The capital of France is"
# The reference decodes in the server's steps (the prompt less its last token, then one
# token at a time), so its logits are the same computation.
LOGPROB_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference(bundled_gguf: Path) -> Iterator[llama_cpp.Llama]:
    """The same GGUF in-process, with logits for every position. Flash attention on, as
    llama.cpp's default (auto) gives the server on CPU: on this model it moves logprobs
    by up to 0.3 against the non-flash kernels."""
    llm = llama_cpp.Llama(
        str(bundled_gguf),
        n_ctx=512,
        logits_all=True,
        n_threads=2,
        flash_attn=True,
        verbose=False,
    )
    yield llm
    llm.close()


def log_softmax_rows(llm: llama_cpp.Llama, tokens: list[int], n_prompt: int) -> np.ndarray:
    """Row i: log-probabilities of the token after tokens[: i + 1], decoded as the server
    decodes: the prompt's first n_prompt - 1 tokens together, then one token per step."""
    llm.reset()
    llm.eval(tokens[: n_prompt - 1])
    for token in tokens[n_prompt - 1 :]:
        llm.eval([token])
    logits = np.array(llm.scores[: len(tokens)], dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))


def test_echo_logprobs_score_the_prompt(
    client: openai.OpenAI, reference: llama_cpp.Llama, vocab: llama_cpp.Llama
) -> None:
    tokens = vocab.tokenize(TEXT.encode(), add_bos=True, special=True)
    completion = client.completions.create(
        model=MODEL, prompt=TEXT, echo=True, logprobs=3, max_tokens=0, temperature=0
    )
    choice = completion.choices[0]
    assert choice.text == TEXT
    logprobs = choice.logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None
    assert len(logprobs.token_logprobs) == len(tokens)
    assert logprobs.token_logprobs[0] is None
    rows = log_softmax_rows(reference, tokens, len(tokens))
    expected = [rows[i - 1, tokens[i]] for i in range(1, len(tokens))]
    assert np.allclose(logprobs.token_logprobs[1:], expected, atol=LOGPROB_TOLERANCE)
    for top, row in zip(logprobs.top_logprobs[1:], rows[:-1], strict=True):  # type: ignore[index]
        assert len(top) == 3
        assert max(top.values()) == pytest.approx(row.max(), abs=LOGPROB_TOLERANCE)


def test_token_id_prompts_are_scored_as_given(
    client: openai.OpenAI, vocab: llama_cpp.Llama
) -> None:
    tokens = vocab.tokenize(TEXT.encode(), add_bos=True, special=True)
    by_ids = client.completions.create(
        model=MODEL, prompt=tokens, echo=True, logprobs=1, max_tokens=0
    )
    by_text = client.completions.create(
        model=MODEL, prompt=TEXT, echo=True, logprobs=1, max_tokens=0
    )
    a = by_ids.choices[0].logprobs.token_logprobs  # type: ignore[union-attr]
    b = by_text.choices[0].logprobs.token_logprobs  # type: ignore[union-attr]
    assert a[0] is None and np.allclose(a[1:], b[1:], atol=1e-4)  # type: ignore[index]


def test_generated_logprobs_match_in_process_logits(
    client: openai.OpenAI, reference: llama_cpp.Llama, vocab: llama_cpp.Llama
) -> None:
    prompt = vocab.tokenize(TEXT.encode(), add_bos=True, special=True)
    completion = client.completions.create(
        model=MODEL, prompt=TEXT, logprobs=5, max_tokens=6, temperature=0
    )
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None
    tokens = list(prompt)
    for token_text, logprob, top in zip(
        logprobs.tokens,
        logprobs.token_logprobs,
        logprobs.top_logprobs,
        strict=True,  # type: ignore[arg-type]
    ):
        row = log_softmax_rows(reference, tokens, len(prompt))[-1]
        best = int(row.argmax())  # greedy: the server's token is the argmax
        assert vocab.detokenize([best]).decode("utf-8", "replace") == token_text
        assert logprob == pytest.approx(row[best], abs=LOGPROB_TOLERANCE)
        assert list(top.values()) == sorted(top.values(), reverse=True)
        tokens.append(best)


def test_chat_logprobs_shape_and_order(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello."}],
        logprobs=True,
        top_logprobs=4,
        max_tokens=8,
        temperature=0,
    )
    choice = response.choices[0]
    content = choice.logprobs.content  # type: ignore[union-attr]
    assert content and len(content) == response.usage.completion_tokens  # type: ignore[union-attr]
    assert b"".join(bytes(t.bytes or []) for t in content).decode() == choice.message.content
    for item in content:
        tops = [t.logprob for t in item.top_logprobs]
        assert len(tops) == 4 and tops == sorted(tops, reverse=True)
        assert item.logprob == pytest.approx(tops[0])  # greedy picks the best


def test_logprob_bytes_of_a_multibyte_token(client: openai.OpenAI, vocab: llama_cpp.Llama) -> None:
    [token] = vocab.tokenize("日本".encode(), add_bos=False)[:1]
    piece = vocab.detokenize([token])
    assert len(piece) > 1 and not piece.isascii()
    response = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "x"}],
        logprobs=True,
        logit_bias={str(token): 100},
        max_tokens=2,
    )
    choice = response.choices[0]
    assert choice.message.content == piece.decode() * 2
    for item in choice.logprobs.content:  # type: ignore[union-attr]
        assert bytes(item.bytes or []) == piece and item.token == piece.decode()


def test_streamed_logprobs_cover_every_token(http: httpx.Client) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Count to five."}],
        "logprobs": True,
        "top_logprobs": 2,
        "max_tokens": 12,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    items, text, usage = [], "", None
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                text += choice["delta"].get("content") or ""
                items += (choice.get("logprobs") or {}).get("content") or []
    assert usage is not None and len(items) == usage["completion_tokens"]
    assert b"".join(bytes(i["bytes"]) for i in items).decode() == text


def test_n_choices_differ_and_share_the_prompt(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a short sentence about the sea."}],
        n=3,
        temperature=0.8,
        seed=11,
        max_tokens=16,
    )
    assert [c.index for c in response.choices] == [0, 1, 2]
    texts = {c.message.content for c in response.choices}
    assert len(texts) == 3
    usage = response.usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert 3 <= usage.completion_tokens <= 48


def test_n_streamed_chunks_carry_their_index(http: httpx.Client) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Name a fruit."}],
        "n": 2,
        "temperature": 0.9,
        "seed": 5,
        "max_tokens": 8,
        "stream": True,
    }
    texts = {0: "", 1: ""}
    finished = set()
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:])["choices"]:
                texts[choice["index"]] += choice["delta"].get("content") or ""
                if choice["finish_reason"]:
                    finished.add(choice["index"])
    assert finished == {0, 1} and all(texts.values())


def test_completions_stream_and_stop(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=24, temperature=0, stop=[" 7"], stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert " 7" not in text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_completions_prompt_list(client: openai.OpenAI) -> None:
    completion = client.completions.create(
        model=MODEL, prompt=["Hello", "Goodbye"], n=2, max_tokens=4, temperature=0.5, seed=1
    )
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    assert completion.usage is not None and completion.usage.completion_tokens <= 16


def test_completions_suffix_is_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="def f(", suffix="return 1", max_tokens=4)
    assert "suffix" in str(info.value)


def test_a_repeated_seeded_request_repeats_bit_for_bit(client: openai.OpenAI) -> None:
    """The repeat reuses every prompt cell and samples its first token from the logits kept
    after the first request's prompt, so even logprobs are the same floats."""
    kwargs: dict[str, object] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Name three rivers of Africa and one fact."}],
        "max_tokens": 24,
        "temperature": 1.0,
        "seed": 31337,
        "logprobs": True,
        "top_logprobs": 2,
    }
    first = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    again = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens
    assert again.choices[0].message.content == first.choices[0].message.content

    def floats(completion: object) -> list[float]:
        content = completion.choices[0].logprobs.content  # type: ignore[attr-defined]
        return [t.logprob for t in content] + [a.logprob for t in content for a in t.top_logprobs]

    assert floats(again) == floats(first) and len(floats(first)) > 24
