"""Chat templates: Gemma 3 fallback format and the sandbox's bounds."""

from __future__ import annotations

import pytest

from ggufserve.generation.templates import ChatTemplate, ChatTemplateError, fallback_template


def gemma(**bounds: float) -> ChatTemplate:
    source = fallback_template("gemma3")
    assert source is not None
    return untrusted(source, **bounds)


def untrusted(
    source: str, timeout_s: float = 2.0, max_output_chars: float = 10_000
) -> ChatTemplate:
    return ChatTemplate(
        source,
        bos_token="<bos>",
        eos_token="<eos>",
        timeout_s=timeout_s,
        max_output_chars=int(max_output_chars),
    )


def test_gemma3_turn_format_folds_system_into_first_user_turn() -> None:
    text = gemma().render(
        [
            {"role": "system", "content": " Be brief. "},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"},
        ]
    )
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_gemma3_system_only_still_reaches_the_model() -> None:
    text = gemma().render([{"role": "system", "content": "Rules"}])
    assert text == "<bos><start_of_turn>user\nRules\n\n<end_of_turn>\n<start_of_turn>model\n"


def test_gemma3_without_generation_prompt() -> None:
    text = gemma().render([{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert text == "<bos><start_of_turn>user\nHi<end_of_turn>\n"


@pytest.mark.parametrize(
    "roles", [["assistant"], ["user", "user"], ["system", "assistant"], ["user", "system"]]
)
def test_gemma3_rejects_non_alternating_roles(roles: list[str]) -> None:
    with pytest.raises(ChatTemplateError, match="alternate"):
        gemma().render([{"role": role, "content": "x"} for role in roles])


def test_no_fallback_for_unknown_architecture() -> None:
    assert fallback_template("no-such-arch") is None


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{% set x = messages.append(1) %}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    ],
)
def test_sandbox_blocks_escapes_and_mutation(source: str) -> None:
    with pytest.raises(ChatTemplateError) as info:
        untrusted(source).render([{"role": "user", "content": "x"}])
    assert "__" not in info.value.client_message


def test_time_bound_stops_runaway_loops() -> None:
    source = (
        "{% for i in range(100000) %}{% for j in range(100000) %}{{ j.real }}"
        "{% endfor %}{% endfor %}"
    )
    with pytest.raises(ChatTemplateError, match="too long"):
        untrusted(source, timeout_s=0.3, max_output_chars=10**12).render([])


def test_output_bound_stops_huge_prompts() -> None:
    source = "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="too long a prompt"):
        untrusted(source, max_output_chars=50_000).render([])


def test_syntax_error_is_reported_without_internals() -> None:
    with pytest.raises(ChatTemplateError, match="does not compile"):
        untrusted("{% for %}")


def test_raise_exception_message_is_kept() -> None:
    with pytest.raises(ChatTemplateError, match="custom reason"):
        untrusted("{{ raise_exception('custom reason') }}").render([])


def test_tojson_keeps_unicode() -> None:
    text = untrusted("{{ messages | tojson }}").render([{"role": "user", "content": "héllo"}])
    assert text == '[{"role": "user", "content": "héllo"}]'
