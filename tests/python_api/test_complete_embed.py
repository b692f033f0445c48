"""``Model.complete`` and ``Model.embed``: the completions and embeddings replies."""

from __future__ import annotations

import asyncio

import pytest

import ggufserve
from ggufserve.api.wire import Completion


def test_complete_and_its_stream_agree(model: ggufserve.Model) -> None:
    reply = model.complete("The capital of France is", max_tokens=6, temperature=0)
    assert isinstance(reply, Completion)
    assert reply.usage is not None and reply.usage.completion_tokens <= 6
    with model.complete("The capital of France is", max_tokens=6, temperature=0, stream=True) as s:
        text = "".join(c.choices[0].text for c in s if c.choices)
    assert text == reply.choices[0].text


def test_acomplete_with_two_prompts(model: ggufserve.Model) -> None:
    reply = asyncio.run(model.acomplete(["One", "Two"], max_tokens=3, temperature=0))
    assert isinstance(reply, Completion)
    assert [c.index for c in reply.choices] == [0, 1]


def test_embed_one_vector_per_input(model: ggufserve.Model) -> None:
    response = model.embed(["a cat", "a dog", "a cat"])
    vectors = [d.embedding for d in response.data]
    assert len(vectors) == 3 and len(vectors[0]) == 640
    assert vectors[0] == vectors[2] != vectors[1]
    again = asyncio.run(model.aembed("a cat"))
    assert again.data[0].embedding == vectors[0]
    with pytest.raises(ggufserve.InvalidRequestError):
        model.embed([])
