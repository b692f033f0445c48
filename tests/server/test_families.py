"""Per-family tool-call and reasoning parsing, streaming equivalence, tool-aware templates."""

from __future__ import annotations

import json
import random
import re
import warnings
from pathlib import Path
from typing import Any

import pytest

from ggufserve.families import (
    ContentDelta,
    Family,
    Gemma3,
    Qwen3VL,
    ReasoningDelta,
    ReplyParser,
    ToolCall,
    family_for,
    parse_reply,
    prompt_opens_reasoning,
)
from ggufserve.families.qwen3_vl import QWEN_CALL_PREFIX, QWEN_CALL_SUFFIX
from ggufserve.families.reasoning import find_marker
from ggufserve.generation.templates import ChatTemplate, ChatTemplateError, shipped_template

DATA = Path(__file__).parent / "data" / "recorded_outputs"
GEMMA = Gemma3()
QWEN = Qwen3VL()
TOOLS = {"get_weather", "get_time"}
Calls = list[tuple[str, Any]]


def calls_of(calls: list[ToolCall]) -> Calls:
    for call in calls:
        assert re.fullmatch(r"call_[A-Za-z0-9_-]{24}", call.id)
    return [(c.name, json.loads(c.arguments)) for c in calls]


def parsed(family: Family, text: str, reasoning_open: bool = False, tools: set[str] = TOOLS):
    content, reasoning, calls = parse_reply(family, text, tools, reasoning_open)
    return content, reasoning, calls_of(calls)


def streamed(
    family: Family, chunks: list[str], reasoning_open: bool = False, tools: set[str] = TOOLS
):
    """Feed chunks; check no delta leaks call text or think tags; return the joined result."""
    parser = ReplyParser(family, tools, reasoning_open)
    openers = family.opener_markers(tools) if tools else ()
    events = []
    for chunk in chunks:
        fed = parser.feed(chunk)
        for event in fed:
            assert "</think>" not in event.text
            # Text that may hold a call is never emitted before the reply ends.
            assert find_marker(event.text, openers)[1] < 0
        events += fed
    last, calls = parser.finish()
    assert all("</think>" not in e.text for e in last)
    events += last
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    return content or None, reasoning or None, calls_of(calls)


def chunkings(text: str) -> list[list[str]]:
    out = [[text], list(text)]
    for seed in range(6):
        rng = random.Random(seed)
        pieces, i = [], 0
        while i < len(text):
            step = rng.randint(1, 9)
            pieces.append(text[i : i + step])
            i += step
        out.append(pieces)
    return out


def assert_stream_matches(family: Family, text: str, reasoning_open: bool = False) -> None:
    whole = parsed(family, text, reasoning_open)
    for chunks in chunkings(text):
        assert streamed(family, chunks, reasoning_open) == whole, chunks


# --- Gemma 3 -------------------------------------------------------------------------

PARIS = ("get_weather", {"city": "Paris"})
GEMMA_CASES: list[tuple[str, str | None, Calls]] = [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [PARIS]),
    ('{"name": "get_weather", "arguments": {"city": "Paris"}}', None, [PARIS]),
    ('{\n  "name": "get_weather",\n  "parameters": "{\\"city\\": \\"Paris\\"}"\n}', None, [PARIS]),
    ('{"name": "get_time"}', None, [("get_time", {})]),
    (
        '[{"name": "get_weather", "parameters": {"city": "Paris"}}, '
        '{"name": "get_time", "parameters": {"zone": "CET"}}]',
        None,
        [PARIS, ("get_time", {"zone": "CET"})],
    ),
    ('```json\n{"name": "get_weather", "parameters": {"city": "Paris"}}\n```', None, [PARIS]),
    ('```\n[{"name": "get_weather", "parameters": {"city": "Paris"}}]\n```', None, [PARIS]),
    ('```tool_code\n{"name": "get_weather", "parameters": {"city": "Paris"}}\n```', None, [PARIS]),
    (
        '```tool_code\nget_weather(city="Paris", days=3)\n```',
        None,
        [("get_weather", {"city": "Paris", "days": 3})],
    ),
    (
        '```tool_code\n[get_weather(city="Paris"), get_time()]\n```',
        None,
        [PARIS, ("get_time", {})],
    ),
    ('[get_weather(city="Paris", days=3)]', None, [("get_weather", {"city": "Paris", "days": 3})]),
    ('[get_weather(city="a]b")]', None, [("get_weather", {"city": "a]b"})]),
    (
        'Sure, let me check.\n{"name": "get_weather", "parameters": {"city": "Paris"}} Done.',
        "Sure, let me check.\n Done.",
        [PARIS],
    ),
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}\n```', None, [PARIS]),
    (
        '[get_weather(city="Paris")]\n```\nprint(1)\n```',
        "```\nprint(1)\n```",
        [PARIS],
    ),
    (
        'Checking.\n```json\n{"name": "get_weather", "parameters": {"city": "Paris"}}\n```\nBye',
        "Checking.\n\nBye",
        [PARIS],
    ),
]
GEMMA_NOT_CALLS = [
    '{"name": "book_flight", "parameters": {"to": "Rome"}}',  # unknown tool
    '{"name": "get_weather", "parameters": {"city": "Paris"}',  # unterminated JSON
    '{"name": "get_weather", "parameters": [1, 2]}',  # arguments not an object
    '{"name": "get_weather", "description": "Weather", "parameters": {"type": "object"}}',
    '[{"name": "get_weather", "parameters": {}}, {"name": "nope", "parameters": {}}]',
    '[get_weather("Paris")]',  # positional argument
    "[get_weather(city=open('x'))]",  # not a literal
    "[get_weather(**kw)]",
    '```tool_code\nimport os\nget_weather(city="Paris")\n```',
    '```json\n{"city": "Paris"}\n```',
    "Use [brackets] and {braces} freely.",
]


@pytest.mark.parametrize(("text", "content", "calls"), GEMMA_CASES)
def test_gemma_call_forms(text: str, content: str | None, calls: Calls) -> None:
    assert parsed(GEMMA, text) == (content, None, calls)
    assert_stream_matches(GEMMA, text)


@pytest.mark.parametrize("text", GEMMA_NOT_CALLS)
def test_gemma_malformed_or_unknown_stays_content(text: str) -> None:
    assert parsed(GEMMA, text) == (text, None, [])
    assert_stream_matches(GEMMA, text)


def test_without_tools_nothing_is_parsed() -> None:
    text = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    assert parsed(GEMMA, text, tools=set()) == (text, None, [])
    assert streamed(GEMMA, list(text), tools=set()) == (text, None, [])


def test_gemma_recorded_outputs() -> None:
    data = json.loads((DATA / "gemma3_270m_tools.json").read_text(encoding="utf-8"))
    assert {t["function"]["name"] for t in data["meta"]["tools"]} == {"get_weather"}
    with_calls = 0
    for record in data["records"]:
        text = record["text"]
        content, reasoning, calls = parsed(GEMMA, text, tools={"get_weather"})
        assert reasoning is None
        if text.startswith('{"name": "get_weather"'):
            with_calls += 1
            assert calls == [("get_weather", {"city": "Rome"})]
            assert content and '"name"' not in content
        else:
            # Echoed schemas and prose: JSON with a "name" that is no tool stays content.
            assert (content, calls) == (text.strip(), [])
        for chunks in chunkings(text)[:4]:
            assert streamed(GEMMA, chunks, tools={"get_weather"}) == (content, None, calls)
    assert with_calls == 2


# --- Qwen3-VL ------------------------------------------------------------------------


def qwen_cases() -> list[dict[str, Any]]:
    data = json.loads((DATA / "qwen3vl_handwritten.json").read_text(encoding="utf-8"))
    assert "hand-written" in data["source"]
    return data["cases"]


@pytest.mark.parametrize("case", qwen_cases(), ids=lambda c: c["id"])
def test_qwen_handwritten_outputs(case: dict[str, Any]) -> None:
    expect = case["expect"]
    calls = [(c["name"], c["arguments"]) for c in expect["calls"]]
    assert parsed(QWEN, case["text"], case["reasoning_open"]) == (
        expect["content"],
        expect["reasoning"],
        calls,
    )
    assert_stream_matches(QWEN, case["text"], case["reasoning_open"])


def test_qwen_call_layout_constants_parse() -> None:
    body = json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})
    text = "\n".join([QWEN_CALL_PREFIX + body + QWEN_CALL_SUFFIX] * 2)
    # The same call twice in one reply is one call (unique_calls).
    assert parsed(QWEN, text) == (None, None, [PARIS])


def test_a_list_cut_by_max_tokens_keeps_its_whole_calls() -> None:
    call = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    other = call.replace("Paris", "Rome")
    text = f'[{call}, {other}, {{"name": "get_wea'
    assert parsed(GEMMA, text) == (
        None,
        None,
        [PARIS, ("get_weather", {"city": "Rome"})],
    )
    assert_stream_matches(GEMMA, text, False)


def test_qwen_bad_block_kept_next_block_parsed() -> None:
    good = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    text = "<tool_call>\nnot json\n" + good + " tail"
    assert parsed(QWEN, text) == ("<tool_call>\nnot json\n tail", None, [PARIS])
    assert_stream_matches(QWEN, text)


# --- Reasoning -----------------------------------------------------------------------

REASONING_CASES = [
    ("plan\n</think>\n\nanswer", True, ("answer", "plan")),
    ("  <think>\nplan\n</think>\n\nanswer", False, ("answer", "plan")),
    ("<think>\nstill thinking", False, (None, "still thinking")),
    ("<thi", False, ("<thi", None)),
    ("answer </think> more", False, ("answer  more", None)),
    ("no tags at all", False, ("no tags at all", None)),
    ("a <think> b", False, ("a <think> b", None)),
    ("\n</think>\n\nonly content", True, ("only content", None)),
    ("   ", True, (None, None)),
]


@pytest.mark.parametrize(("text", "reasoning_open", "expect"), REASONING_CASES)
def test_reasoning_split(
    text: str, reasoning_open: bool, expect: tuple[str | None, str | None]
) -> None:
    for family in (GEMMA, QWEN):
        assert parsed(family, text, reasoning_open)[:2] == expect
        assert_stream_matches(family, text, reasoning_open)


def test_parser_without_family_still_splits_reasoning() -> None:
    assert parse_reply(None, "x</think>y", TOOLS, True) == ("y", "x", [])


def test_prompt_opens_reasoning() -> None:
    assert prompt_opens_reasoning("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_reasoning("<start_of_turn>model\n")


def test_stream_holds_back_partial_tags_and_openers() -> None:
    parser = ReplyParser(QWEN, TOOLS, reasoning_open=True)
    assert parser.feed("plan </thi") == [ReasoningDelta("plan")]
    assert parser.feed("nk>Hi <tool") == [ContentDelta("Hi")]
    assert parser.feed('_call>\n{"name": "get_weather", "arguments": {}}') == []
    events, calls = parser.finish()
    assert events == [] and calls_of(calls) == [("get_weather", {})]


def test_stream_emits_text_as_soon_as_it_cannot_be_a_call() -> None:
    parser = ReplyParser(GEMMA, TOOLS, reasoning_open=False)
    assert parser.feed("Use {") == [ContentDelta("Use")]
    assert parser.feed('"x"') == [ContentDelta(' {"x"')]


@pytest.mark.parametrize("seed", range(20))
def test_random_mixtures_stream_like_whole(seed: int) -> None:
    rng = random.Random(seed)
    parts = [
        "Some prose. ",
        "\n",
        "<think>\n",
        "</think>",
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
        "```json\n",
        "```",
        "[",
        '{"name"',
        "<tool_call>",
        "[get_weather(city='Rome')]",
        " {not json} ",
    ]
    text = "".join(rng.choice(parts) for _ in range(rng.randint(1, 12)))
    for family in (GEMMA, QWEN):
        for reasoning_open in (False, True):
            assert_stream_matches(family, text, reasoning_open)


def test_family_for() -> None:
    assert isinstance(family_for("gemma3"), Gemma3)
    assert isinstance(family_for("qwen3vl"), Qwen3VL)
    assert isinstance(family_for("qwen3vlmoe"), Qwen3VL)
    assert family_for("llama") is None
    assert GEMMA.tool_template == "gemma3_tools.jinja" and QWEN.tool_template is None


def test_trigger_patterns_start_at_the_call() -> None:
    # llama.cpp: regex search; the grammar starts at the first non-empty group.
    def start(patterns: tuple[str, ...], text: str) -> int | None:
        for pattern in patterns:
            found = re.search(pattern, text)
            if found:
                return next(found.start(i) for i in range(1, found.re.groups + 1) if found[i])
        return None

    assert start(Qwen3VL.trigger_patterns, "Let me see.\n<tool_call>\n{") == 12
    assert start(Gemma3.trigger_patterns, 'Ok.\n```json\n[\n {"name"') == 12
    assert start(Gemma3.trigger_patterns, 'Ok. {"name"') == 4
    assert start(Gemma3.trigger_patterns, 'Ok. {"city": "x"}') is None


# --- Templates -----------------------------------------------------------------------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TOOL_CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Rome"}},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
    {"role": "tool", "tool_call_id": "call_2", "name": "get_weather", "content": "18 C"},
]


def template(name: str, bos: str = "<bos>") -> ChatTemplate:
    return ChatTemplate(
        shipped_template(name), bos_token=bos, eos_token="", timeout_s=5, max_output_chars=10**6
    )


def turn_roles(prompt: str) -> list[str]:
    return re.findall(r"<start_of_turn>(\w+)", prompt)


PLAIN_CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Weather?"},
    ],
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
    [
        {"role": "system", "content": [{"type": "text", "text": "Sys list"}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "a"},
                {"type": "image_url", "image_url": {"url": "x"}},
                {"type": "text", "text": " b "},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
    ],
]


@pytest.mark.parametrize("messages", PLAIN_CONVERSATIONS)
def test_gemma_tools_template_matches_gemma3_without_tools(messages: list[dict]) -> None:
    for generation in (True, False):
        assert template("gemma3_tools.jinja").render(
            messages, add_generation_prompt=generation
        ) == template("gemma3.jinja").render(messages, add_generation_prompt=generation)


def test_gemma_tools_template_renders_tools_calls_and_results() -> None:
    messages = [*TOOL_CONVERSATION, {"role": "user", "content": "Thanks! And Oslo?"}]
    prompt = template("gemma3_tools.jinja").render(messages, tools=[WEATHER_TOOL])
    assert prompt.startswith("<bos><start_of_turn>user\nYou have access to functions.")
    assert prompt.count("<bos>") == 1
    assert '{"name": function name, "parameters": dictionary of argument name' in prompt
    listed = prompt.split("Functions:\n", 1)[1].split("\n\nBe brief.", 1)[0]
    assert json.loads(listed) == [WEATHER_TOOL["function"]]
    # user, model (calls), user (both results + the next question): turns still alternate.
    assert turn_roles(prompt) == ["user", "model", "user", "model"]
    model_turn = prompt.split("<start_of_turn>model\n")[1].split("<end_of_turn>")[0]
    assert model_turn == (
        '[{"name": "get_weather", "parameters": {"city": "Paris"}}, '
        '{"name": "get_weather", "parameters": {"city": "Rome"}}]'
    )
    assert parsed(GEMMA, model_turn) == (None, None, [PARIS, ("get_weather", {"city": "Rome"})])
    results = prompt.split("<start_of_turn>user\n")[2].split("<end_of_turn>")[0]
    assert results == (
        'Tool results:\n\nget_weather returned:\n```tool_output\n{"temp_c": 21}\n```\n\n'
        "get_weather returned:\n```tool_output\n18 C\n```\n\nThanks! And Oslo?"
    )
    assert prompt.endswith("<end_of_turn>\n<start_of_turn>model\n")


def test_gemma_tools_template_single_call_and_images() -> None:
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where?"}]},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": TOOL_CONVERSATION[2]["tool_calls"][:1],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Paris"},
    ]
    prompt = template("gemma3_tools.jinja").render(messages, tools=[WEATHER_TOOL])
    assert "<start_of_image>Where?<end_of_turn>" in prompt
    assert 'Checking.\n\n{"name": "get_weather", "parameters": {"city": "Paris"}}<end' in prompt
    assert turn_roles(prompt) == ["user", "model", "user", "model"]


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "tool", "tool_call_id": "x", "content": "1"}],
        [{"role": "user", "content": "a"}, {"role": "tool", "tool_call_id": "x", "content": "1"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "assistant", "content": "a"}],
    ],
)
def test_gemma_tools_template_rejects_bad_order(messages: list[dict]) -> None:
    with pytest.raises(ChatTemplateError, match="Gemma 3 needs"):
        template("gemma3_tools.jinja").render(messages, tools=[WEATHER_TOOL])


# The original qwen3vl.jinja's output for PLAIN_CONVERSATIONS (generation prompt on, off),
# captured before tool support was added: without tools it must not change.
QWEN_PLAIN_EXPECTED = [
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nHello!<|im_end|>\n",
    "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nWeather?<|im_end|>\n"
    "<|im_start|>assistant\n",
    "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nWeather?<|im_end|>\n",
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n"
    "<|im_start|>assistant\n",
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n",
    "<|im_start|>system\nSys list<|im_end|>\n<|im_start|>user\n"
    "a<|vision_start|><|image_pad|><|vision_end|> b <|im_end|>\n"
    "<|im_start|>assistant\nok<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nSys list<|im_end|>\n<|im_start|>user\n"
    "a<|vision_start|><|image_pad|><|vision_end|> b <|im_end|>\n"
    "<|im_start|>assistant\nok<|im_end|>\n",
]


def test_qwen_template_without_tools_unchanged() -> None:
    qwen = template("qwen3vl.jinja", bos="")
    rendered = [
        qwen.render(m, add_generation_prompt=g) for m in PLAIN_CONVERSATIONS for g in (True, False)
    ]
    assert rendered == QWEN_PLAIN_EXPECTED


def test_qwen_template_renders_tools_calls_and_responses() -> None:
    prompt = template("qwen3vl.jinja", bos="").render(TOOL_CONVERSATION, tools=[WEATHER_TOOL])
    system = prompt.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n\n")
    assert "<tools>\n" + json.dumps(WEATHER_TOOL) + "\n</tools>" in system
    assert "within <tool_call></tool_call> XML tags" in system
    assistant = prompt.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    assert assistant == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    )
    assert parsed(QWEN, assistant)[2] == [PARIS, ("get_weather", {"city": "Rome"})]
    assert prompt.endswith(
        '<|im_start|>user\n<tool_response>\n{"temp_c": 21}\n</tool_response>\n'
        "<tool_response>\n18 C\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    assert prompt.count("<|im_start|>user") == 2


def test_qwen_thinking_template() -> None:
    thinking = template("qwen3vl_thinking.jinja", bos="")
    history = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello", "reasoning_content": "greet back"},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "\nneed the tool\n",
            "tool_calls": TOOL_CONVERSATION[2]["tool_calls"][:1],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
    ]
    prompt = thinking.render(history, tools=[WEATHER_TOOL])
    assert "<|im_start|>assistant\nHello<|im_end|>" in prompt  # before the last query
    assert "greet back" not in prompt
    assert (
        "<|im_start|>assistant\n<think>\nneed the tool\n</think>\n\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
    ) in prompt
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    assert prompt_opens_reasoning(prompt)
    off = thinking.render(history[:1], extra={"enable_thinking": False})
    assert off == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert not prompt_opens_reasoning(off)
    inline = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nHello"},
    ]
    assert thinking.render(inline, add_generation_prompt=False).endswith(
        "<|im_start|>assistant\n<think>\nhmm\n</think>\n\nHello<|im_end|>\n"
    )


def test_templates_render_like_transformers() -> None:
    chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    for name, bos in (("gemma3_tools.jinja", "<bos>"), ("qwen3vl.jinja", "")):
        for tools in (None, [WEATHER_TOOL]):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                compiled = chat_template_utils._compile_jinja_template(shipped_template(name))
            hf = compiled.render(
                messages=TOOL_CONVERSATION,
                tools=tools,
                add_generation_prompt=True,
                bos_token=bos,
                eos_token="",
            )
            assert template(name, bos).render(TOOL_CONVERSATION, tools=tools) == hf


def test_plain_reply_passes_through_untouched() -> None:
    """No tools, no reasoning: content keeps its exact text, whitespace included, and each
    chunk comes out as it went in (OpenAI's plain chat)."""
    text = "  Hello there.\n\nBye "
    parser = ReplyParser(GEMMA, set(), reasoning_open=False)
    events = [e for chunk in ("  Hel", "lo there.\n", "\nBye ") for e in parser.feed(chunk)]
    events += parser.finish()[0]
    assert [e.text for e in events] == ["  Hel", "lo there.\n", "\nBye "]
    assert all(isinstance(e, ContentDelta) for e in events)
    assert "".join(e.text for e in events) == text


@pytest.mark.parametrize(
    ("family", "text"),
    [
        (GEMMA, 'Sure.\n{"name": "get_weather", "parameters": {"city": "Par'),
        (QWEN, 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"ci'),
    ],
)
def test_a_call_cut_by_max_tokens_never_reaches_content(family: Family, text: str) -> None:
    parser = ReplyParser(family, TOOLS, reasoning_open=False)
    events = parser.feed(text)
    more, calls = parser.finish(truncated=True)
    assert calls == []
    assert "".join(e.text for e in events + more) == "Sure."
