"""``Model.chat`` / ``achat`` on the bundled Gemma 3 270M: the HTTP API's reply models,
tools, pydantic structured output, n, logprobs, streams that end early, errors."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from pydantic import BaseModel

import ggufserve
from ggufserve.api.wire import ChatCompletion, ChatCompletionChunk
from tests.conftest import NO_EOG
from tests.e2e.test_tools import WEATHER, check_calls

GREEDY = {"temperature": 0, "max_tokens": 12, "logit_bias": NO_EOG}


def in_flight(model: ggufserve.Model) -> int:
    return model._registry.lookup(model.id).in_flight


def test_chat_returns_the_http_reply_model(model: ggufserve.Model) -> None:
    reply = model.chat("Name a colour.", **GREEDY)
    assert isinstance(reply, ChatCompletion)
    assert reply.model == model.id
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 12
    assert reply.choices[0].message.content
    assert in_flight(model) == 0


def test_achat_equals_chat_and_runs_on_the_callers_loop(model: ggufserve.Model) -> None:
    sync = model.chat([{"role": "user", "content": "Name a fruit."}], **GREEDY)

    async def run() -> list[ChatCompletion]:
        replies = await asyncio.gather(*(model.achat("Name a fruit.", **GREEDY) for _ in range(2)))
        return [r for r in replies if isinstance(r, ChatCompletion)]

    replies = asyncio.run(run())
    assert [r.choices[0].message.content for r in replies] == [sync.choices[0].message.content] * 2


def test_stream_joins_to_the_full_reply(model: ggufserve.Model) -> None:
    full = model.chat("Say something.", **GREEDY)
    with model.chat("Say something.", stream=True, **GREEDY) as chunks:
        parts = list(chunks)
    assert all(isinstance(c, ChatCompletionChunk) for c in parts)
    text = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
    assert text == full.choices[0].message.content
    assert parts[-1].choices[0].finish_reason == "length"


def test_breaking_out_of_a_stream_cancels_it_and_frees_the_lease(model: ggufserve.Model) -> None:
    for index, _chunk in enumerate(model.chat("Count.", stream=True, max_tokens=500)):
        if index == 2:
            break
    assert in_flight(model) == 0  # the iterator was collected: generation cancelled
    assert model.chat("Hello.", **GREEDY).usage.completion_tokens == 12


def test_async_stream_breaks_out_and_the_next_call_works(model: ggufserve.Model) -> None:
    async def run() -> int:
        stream = await model.achat("Count.", stream=True, max_tokens=500)
        assert isinstance(stream, ggufserve.AsyncChunkStream)
        async with stream:
            async for _chunk in stream:
                break
        assert in_flight(model) == 0
        reply = await model.achat("Hello.", **GREEDY)
        assert isinstance(reply, ChatCompletion)
        return reply.usage.completion_tokens

    assert asyncio.run(run()) == 12


def test_forced_tool_call_and_its_answer_round_trip(model: ggufserve.Model) -> None:
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = model.chat(
        ask,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=96,
    )
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "tool_calls"
    [(name, _arguments)] = check_calls(message.tool_calls)
    assert name == "get_weather"
    assert message.tool_calls is not None
    result = {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "18 C"}
    answer = model.chat([*ask, message, result], tools=[WEATHER], **GREEDY)
    # The history (the reply message as it came, then the tool result) was accepted.
    assert answer.usage.prompt_tokens > reply.usage.prompt_tokens
    assert answer.usage.completion_tokens == 12


class City(BaseModel):
    name: str
    population: int


def test_pydantic_response_format_gives_parsed(model: ggufserve.Model) -> None:
    reply = model.chat("A city, as JSON.", response_format=City, temperature=0, max_tokens=64)
    assert isinstance(reply, ggufserve.ParsedChatCompletion)
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, City)
    assert message.parsed == City.model_validate(json.loads(message.content or ""))
    assert "parsed" not in reply.model_dump()["choices"][0]["message"]  # the wire shape


def test_n_choices_and_logprobs(model: ggufserve.Model) -> None:
    reply = model.chat("Hi.", n=2, logprobs=True, top_logprobs=2, seed=7, max_tokens=4)
    assert [c.index for c in reply.choices] == [0, 1]
    for choice in reply.choices:
        assert choice.logprobs is not None and choice.logprobs.content
        assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)


def test_context_overflow_raises_the_documented_error(model: ggufserve.Model) -> None:
    with pytest.raises(ggufserve.ContextLengthExceededError) as caught:
        model.chat("Hello.", max_tokens=5000)
    assert caught.value.param == "messages"
    with pytest.raises(ggufserve.InvalidRequestError) as bad:
        model.chat("Hello.", temperature="hot")
    assert bad.value.param == "temperature"
    with pytest.raises(ggufserve.ContextLengthExceededError):
        model.chat("Hello.", max_tokens=5000, stream=True)  # checked before any chunk
    assert in_flight(model) == 0


def test_close_ends_open_streams_and_later_calls_with_the_closed_error(
    bundled_gguf: Path, store_home: Path
) -> None:
    closing = ggufserve.load(bundled_gguf, home=store_home, n_ctx=1024, n_parallel=2)
    chunks = closing.chat("Count.", stream=True, max_tokens=200)
    next(chunks)
    closing.close()
    with pytest.raises(ggufserve.ModelUnavailableError) as stream_error:
        next(chunks)  # not anyio's "portal is not running"
    assert stream_error.value.code == "closed"
    assert list(chunks) == []  # the stream stays ended
    with pytest.raises(ggufserve.ModelUnavailableError) as sync_error:
        closing.chat("Hello.", max_tokens=2)
    with pytest.raises(ggufserve.ModelUnavailableError) as async_error:
        asyncio.run(closing.achat("Hello.", max_tokens=2))
    with pytest.raises(ggufserve.ModelUnavailableError) as embed_error:
        asyncio.run(closing.aembed("Hello."))
    assert {sync_error.value.code, async_error.value.code, embed_error.value.code} == {"closed"}


def test_an_unknown_keyword_is_a_type_error_naming_it(model: ggufserve.Model) -> None:
    with pytest.raises(TypeError, match="max_token"):
        model.chat("Hi", max_token=8)
