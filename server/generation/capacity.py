"""Whether a generation request fits its model: its number of choices against the
engine's slots and queue, each prompt plus ``max_tokens`` against the context (chat and
text completions make the same checks, with their own words for the prompt)."""

from __future__ import annotations

from collections.abc import Sequence

from ggufserve.errors import ContextLengthExceededError, InvalidRequestError


def check_choices(count: int, n_parallel: int, max_queued: int, *, what: str = "n") -> None:
    """Refuse more choices than the engine can run or queue at once.

    Args:
        count: Choices the request asks for (``n``, times the prompts for completions).
        n_parallel / max_queued: The engine's slots and its queue's length.
        what: How the message names ``count`` (e.g. ``"len(prompt) * n"``).

    Raises:
        InvalidRequestError: ``count > n_parallel + max_queued`` (param ``n``).
    """
    n_max = n_parallel + max_queued
    if count > n_max:
        raise InvalidRequestError(f"{what} is at most {n_max} for this model.", param="n")


def check_context(
    n_prompt: int,
    max_tokens: int | None,
    n_ctx: int,
    *,
    part: str,
    param: str,
    image_tokens: Sequence[int] = (),
) -> None:
    """Refuse a prompt that leaves no room in the context, or no room for ``max_tokens``.

    Args:
        n_prompt: The prompt's tokens.
        max_tokens: Tokens asked for (None: whatever room is left, at least one).
        n_ctx: The model's context size, in tokens.
        part: How the message names the prompt (``"messages"``, ``"prompt"``).
        param: The request field the error names.
        image_tokens: Each image's tokens (part of ``n_prompt``); the message names them.

    Raises:
        ContextLengthExceededError: ``n_prompt >= n_ctx``, or ``n_prompt + max_tokens >
            n_ctx``.
    """
    if n_prompt < n_ctx and (max_tokens is None or n_prompt + max_tokens <= n_ctx):
        return
    wanted = 1 if max_tokens is None else max_tokens
    if image_tokens:
        images = ", ".join(f"image {i} takes {n} tokens" for i, n in enumerate(image_tokens, 1))
        asked = "one completion token" if max_tokens is None else f"max_tokens ({max_tokens})"
        raise ContextLengthExceededError(
            f"This model's maximum context length is {n_ctx} tokens. However, {images}; "
            f"with the text ({n_prompt - sum(image_tokens)} tokens) and {asked} that exceeds "
            f"n_ctx ({n_ctx}). Send fewer or smaller images (or a lower image_max_tokens), "
            "less text or a lower max_tokens.",
            param=param,
        )
    raise ContextLengthExceededError(
        f"This model's maximum context length is {n_ctx} tokens. However, you requested "
        f"{n_prompt + wanted} tokens ({n_prompt} in the {part}, {wanted} in the completion). "
        f"Please reduce the length of the {part} or completion.",
        param=param,
    )
