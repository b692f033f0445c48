"""``/v1/embeddings``: OpenAI wire models and the service that validates, tokenizes and embeds.

Request fields follow OpenAI's API reference. The model is strict as the chat request is
(``"5"`` is not a token id) and ignores unknown fields. Checks that need the model
(vocabulary size, embedding width, context size) are made by :class:`EmbeddingService`.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Annotated, Any, Literal

import anyio.to_thread
import numpy as np
import numpy.typing as npt
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)

from ggufserve.api.wire import KeepAlive, PromptInput, StrictModel, input_items
from ggufserve.engine.embedding import EmbeddingEngine
from ggufserve.errors import ContextLengthExceededError, InvalidRequestError

# Characters per token above which a text input cannot fit ``max_tokens``: real text
# averages ~4, Gemma 3's longest token has 31 (Qwen's has 128; such inputs are junk).
MAX_CHARS_PER_TOKEN = 32


class EmbeddingRequest(StrictModel):
    """Body of ``POST /v1/embeddings``.

    ``input`` is one text, a list of texts, one list of token ids, or a list of them.
    ``encoding_format`` None means ``"float"``. ``user`` is accepted and ignored.
    ``keep_alive`` (Ollama's) sets how long the model stays loaded once idle.
    """

    input: PromptInput
    model: str
    dimensions: Annotated[int, Field(ge=1)] | None = None
    encoding_format: Literal["float", "base64"] | None = None
    user: str | None = None
    keep_alive: KeepAlive = None

    @field_validator("input", mode="wrap")
    @classmethod
    def _check_input(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> PromptInput:
        # One message for the union instead of one error per member type.
        try:
            result: PromptInput = handler(value)
        except ValidationError:
            raise ValueError(
                "must be a string, an array of strings, an array of token ids or an array "
                "of arrays of token ids"
            ) from None
        return result


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str
    index: int


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


def _check_chars(
    items: list[str | list[int]], max_item_chars: int | None, max_total_chars: int | None
) -> None:
    """Refuse text inputs too long to tokenize: one over ``max_item_chars`` (what cannot
    fit the model's ``max_tokens`` tokens), or all of them together over
    ``max_total_chars`` (None: no such bound).

    Raises:
        InvalidRequestError: naming ``input`` and the item at fault.
    """
    total = 0
    for index, item in enumerate(items):
        if isinstance(item, str):
            if max_item_chars is not None and len(item) > max_item_chars:
                raise InvalidRequestError(
                    f"'input' item {index} has {len(item)} characters; this model embeds at "
                    f"most {max_item_chars} characters per input.",
                    param="input",
                )
            total += len(item)
    if max_total_chars is not None and total > max_total_chars:
        raise InvalidRequestError(
            f"'input' holds {total} characters; at most {max_total_chars} are allowed per request.",
            param="input",
        )


def _encode(vector: npt.NDArray[np.float32], encoding_format: str | None) -> list[float] | str:
    if encoding_format == "base64":
        # OpenAI's base64 form: the raw little-endian float32 bytes.
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    result: list[float] = vector.tolist()
    return result


class EmbeddingService:
    """Turn an :class:`EmbeddingRequest` into an :class:`EmbeddingResponse`.

    Args:
        max_inputs: Most inputs one request may carry.
        max_total_chars: Most characters over all text inputs (None: no bound but the
            per-input one, ``engine.max_tokens * MAX_CHARS_PER_TOKEN``).
    """

    def __init__(self, max_inputs: int, max_total_chars: int | None = None):
        self._max_inputs = max_inputs
        self._max_total_chars = max_total_chars

    def check(self, body: EmbeddingRequest) -> list[str | list[int]]:
        """The checks that need no model (run before it is leased, so a bad request never
        waits for a load); returns the inputs, one item (text or token ids) per embedding.

        Raises:
            InvalidRequestError: ``input`` is empty, has more than ``max_inputs`` items, more
                characters than ``max_total_chars`` (checked before tokenizing), or an empty
                text or token list (param ``input``).
        """
        items = input_items(body.input)
        if not items:
            raise InvalidRequestError("'input' must not be empty.", param="input")
        if len(items) > self._max_inputs:
            raise InvalidRequestError(
                f"'input' has {len(items)} items; at most {self._max_inputs} are allowed "
                "per request.",
                param="input",
            )
        _check_chars(items, None, self._max_total_chars)
        for index, item in enumerate(items):
            if not item:
                what = "is an empty string" if isinstance(item, str) else "has no token ids"
                raise InvalidRequestError(f"'input' item {index} {what}.", param="input")
        return items

    async def create(
        self,
        body: EmbeddingRequest,
        items: list[str | list[int]],
        *,
        engine: EmbeddingEngine,
        tokenize: Callable[[str], list[int]],
        add_bos: bool,
        bos_token_id: int,
        n_vocab: int,
        model_id: str,
    ) -> EmbeddingResponse:
        """Validate (what needs the model), tokenize and embed every input. Tokenizing and
        the decode run in worker threads: the event loop only awaits.

        Args:
            body: The parsed request.
            items: Its inputs, as :meth:`check` returned them.
            engine: The model's embedding engine.
            tokenize: Text → token ids, without BOS.
            add_bos: Prepend ``bos_token_id`` to inputs that do not start with it (token-id
                inputs too, so a text and its token ids embed alike).
            bos_token_id: The model's BOS id.
            n_vocab: Vocabulary size; token ids must lie in ``[0, n_vocab)``.
            model_id: The id echoed in the response.

        Returns:
            One embedding per input, in order; usage counts every token decoded (BOS too).

        Raises:
            InvalidRequestError: ``dimensions`` differs from the model's width (param
                ``dimensions``); an input has more characters than
                ``engine.max_tokens * MAX_CHARS_PER_TOKEN`` (checked before tokenizing),
                text that cannot be encoded, or a token id out of range (param ``input``).
            ContextLengthExceededError: an input has more than ``engine.max_tokens`` tokens
                (param ``input``).
        """
        if body.dimensions is not None and body.dimensions != engine.n_embd:
            raise InvalidRequestError(
                f"This model's embeddings have {engine.n_embd} dimensions; 'dimensions' must "
                f"be {engine.n_embd} or omitted (shortened embeddings are not supported).",
                param="dimensions",
            )
        _check_chars(items, engine.max_tokens * MAX_CHARS_PER_TOKEN, None)

        def tokenize_all() -> list[list[int]]:
            return [
                self._tokens(index, item, tokenize, add_bos, bos_token_id, n_vocab)
                for index, item in enumerate(items)
            ]

        batch = await anyio.to_thread.run_sync(tokenize_all)
        for index, tokens in enumerate(batch):
            if len(tokens) > engine.max_tokens:
                raise ContextLengthExceededError(
                    f"'input' item {index} has {len(tokens)} tokens; this model embeds at most "
                    f"{engine.max_tokens} tokens per input.",
                    param="input",
                )
        try:
            vectors = await anyio.to_thread.run_sync(engine.embed, batch)
        except ValueError as exc:  # checked above already; the engine's own words if not
            raise InvalidRequestError(f"Invalid 'input': {exc}.", param="input") from None
        n_tokens = sum(len(tokens) for tokens in batch)

        def response() -> EmbeddingResponse:
            return EmbeddingResponse(
                data=[
                    Embedding(embedding=_encode(vector, body.encoding_format), index=index)
                    for index, vector in enumerate(vectors)
                ],
                model=model_id,
                usage=EmbeddingUsage(prompt_tokens=n_tokens, total_tokens=n_tokens),
            )

        # Thousands of vectors take a while to turn into Python floats: off the loop too.
        return await anyio.to_thread.run_sync(response)

    @staticmethod
    def _tokens(
        index: int,
        item: str | list[int],
        tokenize: Callable[[str], list[int]],
        add_bos: bool,
        bos_token_id: int,
        n_vocab: int,
    ) -> list[int]:
        if isinstance(item, str):
            try:
                tokens = tokenize(item)
            except UnicodeEncodeError:
                raise InvalidRequestError(
                    f"'input' item {index} is not valid Unicode text.", param="input"
                ) from None
        else:
            bad = next((token for token in item if not 0 <= token < n_vocab), None)
            if bad is not None:
                raise InvalidRequestError(
                    f"'input' item {index} holds token id {bad}, outside the vocabulary "
                    f"[0, {n_vocab}).",
                    param="input",
                )
            tokens = list(item)
        if add_bos and bos_token_id >= 0 and (not tokens or tokens[0] != bos_token_id):
            tokens = [bos_token_id, *tokens]
        return tokens
