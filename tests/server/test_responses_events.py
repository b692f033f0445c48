"""The Responses stream writer over the chat path's chunks: event order, sequence numbers
and shapes (validated against the openai SDK's published types), usage, failure event."""

from __future__ import annotations

from typing import Any

from openai.types.responses import ResponseFailedEvent, ResponseStreamEvent
from pydantic import BaseModel, TypeAdapter

from ggufserve.api.responses_wire import ResponseObject
from ggufserve.engine.base import Finished, TextDelta
from ggufserve.errors import InvalidRequestError
from ggufserve.families.base import ReplyParser
from ggufserve.generation.chat_reply import ChatChunks
from ggufserve.generation.responses_events import ResponseEvents

EVENTS = TypeAdapter(ResponseStreamEvent)


def writer(done: list[ResponseObject]) -> ResponseEvents:
    chunks = ChatChunks(
        "chatcmpl-x",
        0,
        "m",
        [ReplyParser(None, [], True)],
        want_logprobs=False,
        include_usage=False,
    )
    shell = ResponseObject(id="resp_x", created_at=1.0, status="in_progress", model="m")
    return ResponseEvents(chunks, shell, lambda text: len(text.split()), done.append, lambda: 2.0)


def dumped(events: list[BaseModel]) -> list[dict[str, Any]]:
    return [event.model_dump(mode="json") for event in events]


def test_reasoning_then_text_in_order() -> None:
    done: list[ResponseObject] = []
    events = writer(done)
    out = list(events.opening())
    for text in ["think ", "a bit", "</think>", "Hello", " world"]:
        out += events.on_event(0, TextDelta(text))
    finished = Finished("stop", prompt_tokens=10, completion_tokens=7, cached_tokens=3)
    out += events.on_event(0, finished)
    out += events.closing([finished])
    data = dumped(out)
    for event in data:
        EVENTS.validate_python(event)
    assert [e["sequence_number"] for e in data] == list(range(len(data)))
    kinds = [e["type"] for e in data]
    first_message = kinds.index("response.output_item.added", 3)
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[first_message - 3 : first_message] == [
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert kinds[-1] == "response.completed"
    final = data[-1]["response"]
    assert [item["type"] for item in final["output"]] == ["reasoning", "message"]
    assert final["output"][0]["id"] == "rs_x_0" and final["output"][1]["id"] == "msg_x_1"
    assert final["output"][0]["content"][0]["text"] == "think a bit"
    assert final["output"][1]["content"][0]["text"] == "Hello world"
    assert final["usage"]["output_tokens_details"]["reasoning_tokens"] == 3
    assert final["usage"]["input_tokens_details"] == {"cached_tokens": 3, "cache_write_tokens": 7}
    assert done and done[0].status == "completed" and done[0].completed_at == 2.0


def test_length_makes_an_incomplete_response() -> None:
    events = writer([])
    events.opening()
    events.on_event(0, TextDelta("cut"))
    finished = Finished("length", prompt_tokens=4, completion_tokens=2)
    out = dumped(events.on_event(0, finished) + events.closing([finished]))
    final = out[-1]
    assert final["type"] == "response.incomplete"
    assert final["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["response"]["output"][-1]["status"] == "incomplete"


def test_failure_is_a_response_failed_event() -> None:
    events = writer([])
    events.opening()
    events.on_event(0, TextDelta("partial"))
    payload = events.error_payload(InvalidRequestError("dead end", code="grammar_dead_end"))
    failed = ResponseFailedEvent.model_validate(payload)
    assert failed.response.status == "failed" and failed.sequence_number == 5
    assert failed.response.error is not None
    assert (failed.response.error.code, failed.response.error.type) == (
        "invalid_prompt",
        "grammar_dead_end",
    )
    [message] = failed.response.output
    assert message.status == "incomplete" and message.content[0].text == "partial"  # type: ignore[union-attr]
    assert events.error_event == "response.failed" and events.terminator is None
