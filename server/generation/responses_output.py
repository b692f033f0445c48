"""The chat path's replies → Responses output: output items from a chat choice
(non-streamed; :mod:`ggufserve.generation.responses_events` builds them while streaming),
usage, and the final response.

Output item ids are ``<prefix>_<response suffix>_<output index>`` (``rs``, ``msg``,
``fc``), the same in both paths for the same reply.
"""

from __future__ import annotations

from ggufserve.api.responses_wire import (
    IncompleteDetails,
    InputTokensDetails,
    OutputFunctionCall,
    OutputItem,
    OutputMessage,
    OutputReasoning,
    OutputText,
    OutputTokensDetails,
    ReasoningTextOut,
    ResponseObject,
    ResponseUsage,
)
from ggufserve.api.wire import Choice, CompletionUsage

PREFIXES = {"reasoning": "rs", "message": "msg", "function_call": "fc"}


def item_id(kind: str, suffix: str, output_index: int) -> str:
    return f"{PREFIXES[kind]}_{suffix}_{output_index}"


def response_usage(totals: CompletionUsage, reasoning_tokens: int) -> ResponseUsage:
    """Chat usage → Responses usage (``reasoning_tokens`` at most the output tokens)."""
    cached = totals.prompt_tokens_details.cached_tokens if totals.prompt_tokens_details else 0
    return ResponseUsage(
        input_tokens=totals.prompt_tokens,
        input_tokens_details=InputTokensDetails(
            cached_tokens=cached, cache_write_tokens=totals.prompt_tokens - cached
        ),
        output_tokens=totals.completion_tokens,
        output_tokens_details=OutputTokensDetails(
            reasoning_tokens=min(reasoning_tokens, totals.completion_tokens)
        ),
        total_tokens=totals.total_tokens,
    )


def finished_response(
    shell: ResponseObject,
    output: list[OutputItem],
    finish_reason: str | None,
    totals: ResponseUsage,
    completed_at: float,
) -> ResponseObject:
    """The final response: ``incomplete`` (reason ``max_output_tokens``) when the reply
    stopped at its token limit, else ``completed``."""
    truncated = finish_reason == "length"
    return shell.model_copy(
        update={
            "status": "incomplete" if truncated else "completed",
            "incomplete_details": IncompleteDetails(reason="max_output_tokens")
            if truncated
            else None,
            "output": output,
            "usage": totals,
            "completed_at": completed_at,
        }
    )


def tool_namespaces(shell: ResponseObject) -> frozenset[str]:
    """The names of the request's namespace tools (echoed in the response's ``tools``)."""
    return frozenset(tool["name"] for tool in shell.tools if tool.get("type") == "namespace")


def output_items(
    choice: Choice, suffix: str, namespaces: frozenset[str] = frozenset()
) -> list[OutputItem]:
    """A chat choice's message as output items: reasoning, the message (also when empty
    and no call was made), then one ``function_call`` per tool call (a call of a
    ``namespaces`` tool with its ``namespace``); the last item is ``incomplete`` when the
    reply was cut at its token limit."""
    message = choice.message
    out: list[OutputItem] = []
    if message.reasoning_content:
        out.append(
            OutputReasoning(
                id=item_id("reasoning", suffix, len(out)),
                content=[ReasoningTextOut(text=message.reasoning_content)],
                status="completed",
            )
        )
    if message.content or not message.tool_calls:
        out.append(
            OutputMessage(
                id=item_id("message", suffix, len(out)),
                content=[OutputText(text=message.content or "")],
                status="completed",
            )
        )
    for call in message.tool_calls or []:
        out.append(
            OutputFunctionCall.named(
                call.function.name,
                namespaces,
                id=item_id("function_call", suffix, len(out)),
                call_id=call.id,
                arguments=call.function.arguments,
                status="completed",
            )
        )
    if choice.finish_reason == "length":
        out[-1] = out[-1].model_copy(update={"status": "incomplete"})
    return out
