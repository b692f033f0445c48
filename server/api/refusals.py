"""Request fields this server cannot honour: refused by name (400) instead of ignored.

README.md, "Refused fields", lists the same fields; keep the two in step.
"""

from __future__ import annotations

from ggufserve.api.wire import ChatCompletionRequest, CompletionRequest
from ggufserve.errors import InvalidRequestError

# Field → why, for chat requests: any value other than None is refused.
CHAT_REFUSED = {
    "chat_template": "Chat templates come from the model; a template in the request is never "
    "rendered.",
    "functions": "The legacy 'functions' field is not supported; send 'tools'.",
    "function_call": "The legacy 'function_call' field is not supported; send 'tool_choice'.",
    "audio": "Audio output is not supported.",
    "prediction": "Predicted outputs are not supported.",
    "web_search_options": "Web search is not supported.",
}
COMPLETION_REFUSED = {
    "suffix": "'suffix' (fill-in-the-middle) is not supported.",
}
# service_tier values that change nothing here (one tier).
NEUTRAL_SERVICE_TIERS = (None, "auto", "default")


def refuse_chat_fields(body: ChatCompletionRequest) -> None:
    """Raise for the first chat field this server cannot honour.

    Raises:
        InvalidRequestError: with ``param`` naming the field.
    """
    for name, why in CHAT_REFUSED.items():
        if getattr(body, name) is not None:
            raise InvalidRequestError(why, param=name)
    if body.modalities is not None and body.modalities != ["text"]:
        raise InvalidRequestError(
            "Only the 'text' output modality is supported.", param="modalities"
        )
    if body.service_tier not in NEUTRAL_SERVICE_TIERS:
        raise InvalidRequestError(
            "Only the default service tier exists here.", param="service_tier"
        )
    if body.store:
        raise InvalidRequestError(
            "This server stores no completions; send store: false or omit it.", param="store"
        )
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs: true.", param="top_logprobs")


def refuse_completion_fields(body: CompletionRequest) -> None:
    """Raise for the first completions field this server cannot honour.

    Raises:
        InvalidRequestError: with ``param`` naming the field.
    """
    for name, why in COMPLETION_REFUSED.items():
        if getattr(body, name) is not None:
            raise InvalidRequestError(why, param=name)
    if body.best_of not in (None, 1):
        raise InvalidRequestError("Only best_of=1 is supported; use n.", param="best_of")
