"""Model families as plug-ins: the registry keyed by GGUF architecture, what each family
owns (templates, image placeholder, triggers tokenized once), and the request-side pieces
built from a family: tool selection, the reply grammar (checked token by token by real
llama.cpp with the bundled Gemma 3 vocabulary) and the reply parsed back into calls and
reasoning. Tests parametrized over ``FAMILIES`` cover a new family as soon as it registers."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import pytest

from ggufserve.api.wire import ChatCompletionRequest
from ggufserve.converters.arch import ARCHITECTURES
from ggufserve.engine.base import GrammarSpec
from ggufserve.errors import InvalidRequestError
from ggufserve.families import (
    FAMILIES,
    THINK,
    Family,
    Gemma3,
    ImagePlaceholder,
    Qwen3VL,
    ReasoningTags,
    ReplyParser,
    family_for,
    parse_reply,
    prompt_opens_reasoning,
    reasoning_tags,
)
from ggufserve.families.reasoning import find_marker
from ggufserve.generation.constraints import (
    ToolSelection,
    format_grammar,
    reply_grammar,
    select_tools,
)
from ggufserve.generation.templates import ChatTemplate, fallback_template, shipped_template
from ggufserve.grammar import JSON_OBJECT_GBNF
from tests.server.test_grammar import Grammars

CLASSES = sorted(set(FAMILIES.values()), key=lambda cls: cls.name)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
Call = tuple[str, dict[str, Any]]
PARIS: Call = ("get_weather", {"city": "Paris"})
NOW: Call = ("get_time", {})


@pytest.fixture(scope="module")
def vocab(bundled_gguf: Path) -> Iterator[llama_cpp.Llama]:
    llm = llama_cpp.Llama(str(bundled_gguf), vocab_only=True, verbose=False)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def grammars(vocab: llama_cpp.Llama) -> Grammars:
    return Grammars(vocab)


def request(**fields: Any) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], **fields}
    return ChatCompletionRequest.model_validate(body)


def written(family: Family, *calls: Call) -> str:
    """Calls laid out as the family's call syntax says a constrained reply writes them."""
    syntax = family.call_syntax
    objects = [json.dumps({"name": name, syntax.arguments_key: args}) for name, args in calls]
    if syntax.json_list:
        payload = objects[0] if len(objects) == 1 else "[" + ", ".join(objects) + "]"
        return syntax.call_prefix + payload + syntax.call_suffix
    return syntax.separator.join(syntax.call_prefix + o + syntax.call_suffix for o in objects)


def grammar_for(family: Family | None, reasoning_open: bool = False, **fields: Any) -> GrammarSpec:
    body = request(**fields)
    spec = reply_grammar(
        format_grammar(body), select_tools(body), family, reasoning_open=reasoning_open
    )
    assert spec is not None
    return spec


# --- The registry -----------------------------------------------------------------------


def test_registry_is_keyed_by_gguf_architecture_only() -> None:
    for architecture, cls in FAMILIES.items():
        assert architecture in cls.architectures
        assert type(family_for(architecture)) is cls
    # No architecture claimed twice (a later family would silently win).
    assert sum(len(cls.architectures) for cls in CLASSES) == len(FAMILIES)
    assert family_for("qwen3_vl") is None  # a display name is no key
    assert family_for("llama") is None


def test_every_architecture_the_converters_write_has_a_family() -> None:
    written_archs = {text.gguf_arch for text, _ in ARCHITECTURES.values()}
    assert {"gemma3", "qwen3vl", "qwen3vlmoe"} <= written_archs <= FAMILIES.keys()


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.name)
def test_shipped_templates_compile_and_place_images_as_the_family_says(
    cls: type[Family],
) -> None:
    assert cls.fallback_template is not None and cls.image_placeholder is not None
    for architecture in cls.architectures:
        assert fallback_template(architecture) == shipped_template(cls.fallback_template)
    image_turn = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}
    ]
    names = [cls.fallback_template, *([cls.tool_template] if cls.tool_template else [])]
    for name in names:
        template = ChatTemplate(
            shipped_template(name),
            bos_token="<B>",
            eos_token="<E>",
            timeout_s=5,
            max_output_chars=10**6,
        )
        prompt = template.render(image_turn)
        assert prompt.count(cls.image_placeholder.text) == 1, name


def test_image_placeholders() -> None:
    gemma, qwen = Gemma3.image_placeholder, Qwen3VL.image_placeholder
    assert gemma is not None and qwen is not None
    assert gemma.place("a<start_of_image>b", 1, "<M>") == "a\n\n<M>\n\nb"
    assert qwen.place("a<|vision_start|><|image_pad|><|vision_end|>b", 1, "<M>") == "a<M>b"
    assert gemma.place("a<start_of_image>b", 2, "<M>") is None
    assert ImagePlaceholder("<i>", "{marker}").place("<i><i>", 2, "@") == "@@"


# --- Triggers: tokenized once, when the model loads ----------------------------------------


def test_single_token_opener_is_tokenized_once_and_triggers() -> None:
    asked: list[str] = []

    def tokenize(text: str) -> list[int]:
        asked.append(text)
        return [151657] if text == "<tool_call>" else [1, 2]

    qwen = Qwen3VL(tokenize)
    assert asked == ["<tool_call>"] and qwen.trigger_tokens == (151657,)
    for _ in range(3):
        spec = grammar_for(qwen, tools=[WEATHER])
        assert spec.trigger_tokens == (151657,)
        assert spec.trigger_patterns == Qwen3VL.trigger_patterns
    assert asked == ["<tool_call>"]  # requests do not tokenize it again
    assert Gemma3(tokenize).trigger_tokens == ()  # several tokens: patterns only
    assert Qwen3VL().trigger_tokens == ()  # no model, no tokens


def test_gemma_opener_is_several_tokens_of_its_vocabulary(vocab: llama_cpp.Llama) -> None:
    def tokenize(text: str) -> list[int]:
        return vocab.tokenize(text.encode(), add_bos=False, special=True)

    assert len(tokenize(Gemma3.call_openers[0])) > 1
    assert Gemma3(tokenize).trigger_tokens == ()
    assert grammar_for(Gemma3(tokenize), tools=[WEATHER]).trigger_tokens == ()


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.name)
def test_triggers_and_openers_find_the_written_call(cls: type[Family]) -> None:
    family = cls()
    prose = "Let me check.\n"
    text = prose + written(family, PARIS)
    starts = []
    for pattern in cls.trigger_patterns:
        found = re.search(pattern, text)
        if found:
            starts.append(next(found.start(i) for i in range(1, found.re.groups + 1) if found[i]))
    assert starts and starts[0] == len(prose)  # llama.cpp takes the first matching pattern
    pos, end, marker = find_marker(text, family.opener_markers({"get_weather"}))
    assert pos == len(prose) and end > pos and marker is not None


# --- Tool selection ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "shown", "callable_", "forced", "max_calls"),
    [
        ({}, None, [], False, 8),
        (
            {"tools": [WEATHER, TIME]},
            ["get_weather", "get_time"],
            ["get_weather", "get_time"],
            False,
            8,
        ),
        (
            {"tools": [WEATHER], "tool_choice": "auto", "parallel_tool_calls": False},
            ["get_weather"],
            ["get_weather"],
            False,
            1,
        ),
        ({"tools": [WEATHER, TIME], "tool_choice": "none"}, None, [], False, 8),
        (
            {"tools": [WEATHER, TIME], "tool_choice": "required"},
            ["get_weather", "get_time"],
            ["get_weather", "get_time"],
            True,
            8,
        ),
        (
            {
                "tools": [WEATHER, TIME],
                "tool_choice": {"type": "function", "function": {"name": "get_time"}},
            },
            ["get_weather", "get_time"],
            ["get_time"],
            True,
            8,
        ),
        (
            {"tools": [WEATHER], "tool_choice": "none", "response_format": {"type": "json_object"}},
            None,
            [],
            False,
            8,
        ),
    ],
)
def test_select_tools(
    fields: dict[str, Any],
    shown: list[str] | None,
    callable_: list[str],
    forced: bool,
    max_calls: int,
) -> None:
    selection = select_tools(request(**fields))
    shown_names = (
        None if selection.shown is None else [t["function"]["name"] for t in selection.shown]
    )
    assert shown_names == shown
    assert [t["function"]["name"] for t in selection.callable] == callable_
    assert selection.names == set(callable_)
    assert (selection.forced, selection.max_calls) == (forced, max_calls)
    assert not selection.uses_tool_turns


def test_select_tools_sees_tool_turns_in_the_history() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    history = [
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "noon"},
    ]
    selection = select_tools(request(messages=history))
    assert selection.uses_tool_turns and selection.shown is None and not selection.callable
    only_result = [{"role": "user", "content": "x"}, history[2]]
    assert select_tools(request(messages=only_result)).uses_tool_turns


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
        ),
        ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_select_tools_refuses(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        select_tools(request(**fields))
    assert caught.value.param == param


# --- The reply grammar -------------------------------------------------------------------


@pytest.mark.parametrize("family", [None, Gemma3(), Qwen3VL()], ids=["none", "gemma3", "qwen3vl"])
def test_free_output_has_no_grammar(family: Family | None) -> None:
    for fields in (
        {},
        {"response_format": {"type": "text"}},
        {"tools": [WEATHER], "tool_choice": "none"},
    ):
        body = request(**fields)
        for reasoning_open in (False, True):
            assert (
                reply_grammar(
                    format_grammar(body), select_tools(body), family, reasoning_open=reasoning_open
                )
                is None
            )


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.name)
def test_auto_calls_grammar_is_lazy_and_round_trips(grammars: Grammars, cls: type[Family]) -> None:
    family = cls()
    spec = grammar_for(family, tools=[WEATHER, TIME])
    assert spec.trigger_patterns == cls.trigger_patterns and spec.lazy
    one, two = written(family, PARIS), written(family, PARIS, NOW)
    assert grammars.accepts(spec.gbnf, one)
    assert grammars.accepts(spec.gbnf, two)
    assert not grammars.accepts(spec.gbnf, written(family, ("get_news", {})))
    assert not grammars.accepts(spec.gbnf, written(family, ("get_weather", {"town": "Paris"})))
    single = grammar_for(family, tools=[WEATHER, TIME], parallel_tool_calls=False)
    assert grammars.accepts(single.gbnf, one) and not grammars.accepts(single.gbnf, two)
    # What the grammar lets the model write, the family parses back.
    for text, expected in ((one, [PARIS]), (two, [PARIS, NOW])):
        content, reasoning, calls = parse_reply(
            family, "Sure.\n" + text, {"get_weather", "get_time"}, False
        )
        assert (content, reasoning) == ("Sure.", None)
        assert [(c.name, json.loads(c.arguments)) for c in calls] == expected


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.name)
def test_forced_call_grammar(grammars: Grammars, cls: type[Family]) -> None:
    family = cls()
    named = {"type": "function", "function": {"name": "get_time"}}
    spec = grammar_for(family, tools=[WEATHER, TIME], tool_choice=named)
    assert not spec.lazy  # from the first token
    assert grammars.accepts(spec.gbnf, written(family, NOW))
    assert not grammars.accepts(spec.gbnf, written(family, PARIS))  # not the named tool
    assert not grammars.accepts(spec.gbnf, "It is noon.")
    # A reasoning model thinks first: the call starts after the family's closing tag.
    spec = grammar_for(family, reasoning_open=True, tools=[WEATHER], tool_choice="required")
    close = cls.reasoning.close
    assert spec.trigger_patterns == (f"({re.escape(close)})",) and not spec.trigger_tokens
    assert grammars.accepts(spec.gbnf, close + "\n" + written(family, PARIS))
    assert not grammars.accepts(spec.gbnf, written(family, PARIS))
    content, reasoning, calls = parse_reply(
        family, "plan" + close + "\n" + written(family, PARIS), {"get_weather"}, True
    )
    assert (content, reasoning, [c.name for c in calls]) == (None, "plan", ["get_weather"])


@pytest.mark.parametrize("family", [None, Gemma3(), Qwen3VL()], ids=["none", "gemma3", "qwen3vl"])
def test_json_reply_grammar_starts_after_reasoning(
    grammars: Grammars, family: Family | None
) -> None:
    plain = grammar_for(family, response_format={"type": "json_object"})
    assert plain == GrammarSpec(JSON_OBJECT_GBNF)
    spec = grammar_for(family, reasoning_open=True, response_format={"type": "json_object"})
    assert spec.trigger_patterns == ("(</think>)",)
    assert grammars.accepts(spec.gbnf, '</think>\n{"a": 1}')
    assert not grammars.accepts(spec.gbnf, '{"a": 1}')
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    spec = grammar_for(family, response_format=fmt)
    assert grammars.accepts(spec.gbnf, '{"n": 3}') and not grammars.accepts(spec.gbnf, '{"n": "3"}')


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "strict": True,  # a non-strict tool drops what is unenforceable
                            "parameters": {
                                "type": "object",
                                "properties": {"n": {"type": "integer", "maximum": 3}},
                            },
                        },
                    }
                ]
            },
            "tools",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 0}},
                }
            },
            "response_format.json_schema.schema",
        ),
    ],
)
def test_model_free_checks_refuse_what_the_grammar_cannot_enforce(
    fields: dict[str, Any], param: str
) -> None:
    # select_tools and format_grammar run before a model is leased (no family needed).
    body = request(**fields)
    with pytest.raises(InvalidRequestError) as caught:
        select_tools(body)
        format_grammar(body)
    assert caught.value.param == param


# --- Reasoning tags belong to the family ----------------------------------------------------


class _TaggedQwen(Qwen3VL):
    """A family whose reasoning tags differ (as a new family's may)."""

    name = "tagged"
    architectures = ("test-tagged",)
    reasoning = ReasoningTags("<reasoning>", "</reasoning>")


def test_reasoning_tags_come_from_the_family(grammars: Grammars) -> None:
    assert reasoning_tags(None) == THINK == reasoning_tags(Gemma3()) == reasoning_tags(Qwen3VL())
    family = _TaggedQwen()
    prompt = "<|im_start|>assistant\n<reasoning>\n"
    assert prompt_opens_reasoning(prompt, reasoning_tags(family))
    assert not prompt_opens_reasoning(prompt)  # <think> tags
    spec = grammar_for(family, reasoning_open=True, response_format={"type": "json_object"})
    assert spec.trigger_patterns == ("(</reasoning>)",)
    assert grammars.accepts(spec.gbnf, '</reasoning> {"a": 1}')
    assert not grammars.accepts(spec.gbnf, '</think> {"a": 1}')
    text = "<reasoning>hm</reasoning>Hi <think>x</think>" + written(family, PARIS)
    content, reasoning, calls = parse_reply(family, text, {"get_weather"}, False)
    assert (content, reasoning) == ("Hi <think>x</think>", "hm")
    assert [c.name for c in calls] == ["get_weather"]
    # Streamed in small chunks, the same split and no tag in any delta.
    parser = ReplyParser(family, {"get_weather"}, False)
    events = [e for i in range(0, len(text), 3) for e in parser.feed(text[i : i + 3])]
    more, streamed_calls = parser.finish()
    assert all("reasoning>" not in e.text for e in events + more)
    assert [c.name for c in streamed_calls] == ["get_weather"]


def test_selection_names_what_the_parser_takes_out() -> None:
    selection = ToolSelection(
        shown=[WEATHER], callable=[WEATHER], forced=False, parallel=True, uses_tool_turns=False
    )
    text = written(Qwen3VL(), PARIS) + written(Qwen3VL(), NOW)
    content, _, calls = parse_reply(Qwen3VL(), text, selection.names, False)
    # get_time is not callable: its block stays content.
    assert [c.name for c in calls] == ["get_weather"]
    assert content is not None and "get_time" in content
