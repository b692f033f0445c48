"""llama.cpp tokenization of our GGUF equals the HF tokenizer's on 500+ varied strings."""

from __future__ import annotations

import itertools
import random
from typing import Any

import llama_cpp
import pytest

from ggufserve.converters.convert import ConversionResult

BASE = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces",
    "trailing spaces   ",
    "tabs\tand\nnewlines\n\n\nthree",
    "multiple     spaces      inside",
    "def add(a, b):\n    return a + b\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "<html><body><p>Hi &amp; bye</p></body></html>",
    '{"key": [1, 2.5, null, true], "x": "y"}',
    "SELECT * FROM users WHERE id = 42;",
    "日本語のテキストです。",
    "中文分词测试，包括标点符号！",
    "한국어 문장입니다.",
    "Ελληνικά και русский текст",
    "مرحبا بالعالم",
    "emoji 🙂🚀👩‍👩‍👧 flags 🇫🇷",
    "numbers 1234567890 3.14159 -42 1e10",
    "URLs https://example.com/a?b=c&d=e#f",
    "mixed Case CamelCase snake_case kebab-case",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text after bos",
    "text with <eos> inside",
    "\u00a0non-breaking\u2009thin\u200bzero-width",
    "a" * 40,
    " " * 33,
    "\n" * 5 + "x",
    "café naïve résumé",
    "Ünïcödé ßtraße",
    "math: ∑ ∫ √ ∞ ≈ ≠",
]
WORDS = [
    "alpha",
    "beta",
    "γάμμα",
    "дельта",
    "東京",
    "🙂",
    "code()",
    "x=1",
    "\n",
    "  ",
    "\t",
    "ünï",
    "end.",
]


def corpus() -> list[str]:
    rng = random.Random(1234)
    strings = list(BASE)
    strings += [a + " " + b for a, b in itertools.combinations(BASE[:20], 2)]
    for _ in range(300):
        strings.append(
            "".join(
                rng.choice(WORDS) + rng.choice(["", " ", "  ", "\n"])
                for _ in range(rng.randint(1, 12))
            )
        )
    return strings


def test_corpus_is_large_and_varied() -> None:
    strings = corpus()
    assert len(strings) >= 500
    assert len(set(strings)) >= 500


@pytest.mark.parametrize("which", ["text-f32", "mm-f32"])
def test_tokenizer_parity(
    hf_text: tuple[Any, Any], converted: dict[str, ConversionResult], which: str
) -> None:
    _, tokenizer = hf_text
    llama = llama_cpp.Llama(str(converted[which].text), vocab_only=True, verbose=False)
    mismatches = []
    strings = corpus()
    for text in strings:
        expected = tokenizer(text)["input_ids"]
        got = llama.tokenize(text.encode(), add_bos=True, special=True)
        if got != expected:
            mismatches.append((text, expected[:12], got[:12]))
    assert not mismatches, f"{len(mismatches)}/{len(strings)} differ, e.g. {mismatches[:3]}"
