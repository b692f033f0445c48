"""Responses service: ``/v1/responses`` on the chat path.

:class:`ResponsesService` is a generation service (see ``ggufserve.api.routes.generate``)
that wraps a :class:`~ggufserve.generation.chat.ChatService`: a Responses request (and the
stored conversation its ``previous_response_id`` continues) is translated to a chat
request (:mod:`ggufserve.generation.responses_input`), checked, prepared and run by the
chat service, and its reply converted (:mod:`ggufserve.generation.responses_output`,
:mod:`ggufserve.generation.responses_events`).
A chained request renders the previous turns exactly as they were, so the engine's
prefix cache serves them and a turn costs only its new tokens. With ``store`` (default
true) the response is kept in the :class:`~ggufserve.generation.response_store.ResponseStore`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import anyio.to_thread

from ggufserve.api.responses_wire import (
    FunctionChoice,
    FunctionTool,
    NamespaceTool,
    ReasoningEcho,
    ResponseObject,
    ResponsesRequest,
)
from ggufserve.engine.worker import Generation
from ggufserve.errors import InvalidRequestError, NotFoundError
from ggufserve.generation.chat import ChatService, CheckedChat, PreparedChat
from ggufserve.generation.response_store import ResponseStore
from ggufserve.generation.responses_events import ResponseEvents
from ggufserve.generation.responses_input import (
    item_records,
    refuse_response_fields,
    request_items,
    responses_param,
    stored_items,
    translate,
)
from ggufserve.generation.responses_output import (
    finished_response,
    output_items,
    response_usage,
    tool_namespaces,
)
from ggufserve.generation.streaming import sse_stream
from ggufserve.models.served_model import Lease

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckedResponse:
    """A Responses request that passed the model-free checks: the chat request's checks,
    the conversation it continues (stored items) and the chat messages' origins."""

    body: ResponsesRequest
    chat: CheckedChat
    history: list[dict[str, Any]]
    origins: list[str]


@dataclass(frozen=True)
class PreparedResponse:
    """A prepared request: the chat path's, the response as created, its input items."""

    checked: CheckedResponse
    chat: PreparedChat
    shell: ResponseObject
    input_items: list[dict[str, Any]]


class ResponsesService:
    """Builds and runs ``/v1/responses`` requests through the chat service.

    Args:
        chat: The chat completions service (prompts, tools, grammar, images, jobs).
        store: Where stored responses are kept.
        clock: Unix time in seconds.
    """

    def __init__(
        self, chat: ChatService, store: ResponseStore, clock: Callable[[], float] = time.time
    ):
        self._chat = chat
        self._store = store
        self._clock = clock

    def check(self, body: ResponsesRequest) -> CheckedResponse:
        """The checks needing no model (a worker thread: it reads the store).

        Raises:
            InvalidRequestError: a refused field, item, content or tool kind (named), or
                anything the chat checks refuse (param mapped to this request's).
            NotFoundError: ``previous_response_id`` names no stored response.
        """
        refuse_response_fields(body)
        history: list[dict[str, Any]] = []
        if body.previous_response_id is not None:
            stored = self._store.get(body.previous_response_id)
            if stored is None:
                raise NotFoundError(
                    f"Previous response with id '{body.previous_response_id[:100]}' not "
                    "found (unknown, deleted, expired, or created with store: false).",
                    param="previous_response_id",
                )
            history = stored.conversation()
        translated = translate(body, stored_items(history))
        try:
            chat = self._chat.check(translated.chat)
        except InvalidRequestError as exc:
            exc.param = responses_param(exc.param, translated.origins)
            raise
        return CheckedResponse(body, chat, history, translated.origins)

    async def prepare(
        self, checked: CheckedResponse, lease: Lease, request_id: str
    ) -> PreparedResponse:
        """Prepare the chat request on the leased model (see ``ChatService.prepare``).

        Raises:
            InvalidRequestError / ContextLengthExceededError: as the chat path's, with the
                Responses parameter named.
        """
        try:
            chat = await self._chat.prepare(checked.chat, lease, request_id)
        except InvalidRequestError as exc:
            exc.param = responses_param(exc.param, checked.origins)
            raise
        response_id = f"resp_{request_id}"
        records = item_records(request_items(checked.body), response_id)
        shell = _shell(checked.body, response_id, chat.served.id, self._clock())
        return PreparedResponse(checked, chat, shell, records)

    def start(self, prepared: PreparedResponse) -> list[Generation]:
        """Queue the request (see ``ChatService.start``)."""
        return self._chat.start(prepared.chat)

    async def complete(
        self, prepared: PreparedResponse, generations: list[Generation], request_id: str
    ) -> ResponseObject:
        """Run the request to its end: the final response (stored when asked).

        Raises:
            APIError: as ``ChatService.complete``.
        """
        completion = await self._chat.complete(prepared.chat, generations, request_id)
        choice = completion.choices[0]
        suffix = prepared.shell.id.removeprefix("resp_")
        reasoning = choice.message.reasoning_content or ""

        def finish() -> ResponseObject:
            totals = response_usage(completion.usage, self._count(prepared, reasoning))
            items = output_items(choice, suffix, tool_namespaces(prepared.shell))
            final = finished_response(
                prepared.shell, items, choice.finish_reason, totals, self._clock()
            )
            self._keep(prepared, final)
            return final

        return await anyio.to_thread.run_sync(finish)

    async def stream(
        self, prepared: PreparedResponse, generations: list[Generation], request_id: str
    ) -> AsyncIterator[str]:
        """The response's typed events (see :class:`ResponseEvents`); stored at the end
        when asked, before the last event is sent (so a chained request finds it)."""
        writer = self.writer(prepared, generations, defer_final=True)
        async for frame in sse_stream(generations, request_id, writer):
            yield frame
        # Re-tokenizing the reasoning and writing the store: off the event loop.
        final = await anyio.to_thread.run_sync(writer.final_frame)
        if final is not None:
            yield final

    def writer(
        self, prepared: PreparedResponse, generations: list[Generation], defer_final: bool = False
    ) -> ResponseEvents:
        """The stream's event writer, over the chat path's chunk writer (``defer_final``:
        see :class:`ResponseEvents`)."""
        return ResponseEvents(
            self._chat.writer(prepared.chat, generations),
            prepared.shell,
            lambda text: self._count(prepared, text),
            lambda final: self._keep(prepared, final),
            self._clock,
            defer_final,
        )

    @staticmethod
    def _count(prepared: PreparedResponse, reasoning: str) -> int:
        """Tokens of the reasoning text: the engine counts generated tokens, not which
        part they went to, so the split-out reasoning is tokenized again (its tags
        excluded; a token at its edges may differ from what was sampled)."""
        return len(prepared.chat.parts.engine.tokenize(reasoning)) if reasoning else 0

    def _keep(self, prepared: PreparedResponse, final: ResponseObject) -> None:
        """Store the final response with its input items and history (``store`` not
        false); a store that cannot be written is logged, the reply still goes out."""
        if not final.store:
            return
        try:
            self._store.put(
                final.model_dump(mode="json"), prepared.input_items, prepared.checked.history
            )
        except Exception:
            log.exception("response %s could not be stored", final.id)


def _shell(body: ResponsesRequest, response_id: str, model: str, now: float) -> ResponseObject:
    """The response as created: the request's settings echoed, no output yet."""
    text: dict[str, Any] = {"format": {"type": "text"}}
    if body.text is not None:
        if body.text.format is not None:
            text["format"] = body.text.format.model_dump(by_alias=True, exclude_none=True)
        if body.text.verbosity is not None:
            text["verbosity"] = body.text.verbosity
    choice: Any = body.tool_choice or "auto"
    if isinstance(choice, FunctionChoice):
        choice = choice.model_dump()
    reasoning = body.reasoning
    return ResponseObject(
        id=response_id,
        created_at=now,
        status="in_progress",
        instructions=body.instructions,
        max_output_tokens=body.max_output_tokens,
        metadata=body.metadata or {},
        model=model,
        parallel_tool_calls=body.parallel_tool_calls is not False,
        previous_response_id=body.previous_response_id,
        reasoning=ReasoningEcho(
            effort=reasoning.effort if reasoning else None,
            summary=reasoning.summary if reasoning else None,
        ),
        store=body.store is not False,
        temperature=body.temperature,
        text=text,
        tool_choice=choice,
        tools=[
            tool.model_dump(exclude_none=True)
            for tool in body.tools or []
            if isinstance(tool, (FunctionTool, NamespaceTool))
        ],
        top_p=body.top_p,
        user=body.user,
    )
