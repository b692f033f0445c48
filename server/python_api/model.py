""":class:`Model`: one loaded model served in-process, through the same services,
registry and engine as the HTTP server (:mod:`ggufserve.generation.requests`)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

from anyio.from_thread import BlockingPortal, start_blocking_portal
from pydantic import BaseModel

from ggufserve.api.wire import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
)
from ggufserve.errors import ModelUnavailableError
from ggufserve.generation.chat import ChatService
from ggufserve.generation.completions import CompletionService
from ggufserve.generation.embeddings import EmbeddingRequest, EmbeddingResponse, EmbeddingService
from ggufserve.generation.requests import (
    GenerationService,
    Running,
    create_embeddings,
    start_generation,
)
from ggufserve.models.registry import ModelRegistry, ModelState
from ggufserve.python_api.inputs import Messages, chat_messages, response_format, validated
from ggufserve.python_api.replies import ParsedChatCompletion, with_parsed
from ggufserve.python_api.streams import AsyncChunkStream, ChunkStream
from ggufserve.settings import ModelEntry, ServerSettings

T = TypeVar("T")
# progress(stage, fraction): stage "load", fraction of the weights read (0..1).
ProgressCallback = Callable[[str, float], None]
POLL_S = 0.1


class Model:
    """A model loaded in this process (see :func:`ggufserve.load`).

    Calls from any number of threads (or tasks) run together: the engine batches them as
    it batches HTTP requests. The sync methods run on the model's own event loop (an anyio
    blocking portal thread); the ``a``-prefixed ones run on the caller's asyncio loop.
    Requests and replies are the HTTP API's pydantic models (``ggufserve.api.wire``).

    Args:
        entry: The model's settings (a ``models.yaml`` entry).
        settings: Server limits (queue size, prompt and image caps); default: the
            environment's ``GGUFSERVE_*`` variables, else the defaults.
        progress: Called from this thread while the weights load.

    Raises:
        ModelUnavailableError: the model failed to load (code ``model_load_failed``; the
            reason is logged), or does not fit ``max_memory`` (``model_too_large``).
    """

    def __init__(
        self,
        entry: ModelEntry,
        settings: ServerSettings | None = None,
        *,
        progress: ProgressCallback | None = None,
    ):
        self.entry = entry
        self.settings = settings or ServerSettings()
        self._chat = ChatService(self.settings)
        self._completions = CompletionService(self.settings)
        self._embeddings = EmbeddingService(
            self.settings.max_embedding_inputs, self.settings.max_embedding_chars
        )
        self._registry = ModelRegistry([entry], Path.cwd(), self.settings)
        self._exit = contextlib.ExitStack()
        self._portal: BlockingPortal | None = self._exit.enter_context(start_blocking_portal())
        self._exit.callback(self._registry.close)  # runs first: unload while the loop lives
        try:
            self._load(progress)
        except BaseException:
            self.close()
            raise

    @property
    def id(self) -> str:
        """The model id replies carry (``model`` field)."""
        return self.entry.id

    def _load(self, progress: ProgressCallback | None) -> None:
        served = self._registry.lookup(self.id)
        self._registry.start_loading()
        pending = served.loading
        while pending is not None and not pending.done():
            if progress is not None:
                progress("load", served.load_progress or 0.0)
            wait_futures([pending], POLL_S)
        if served.state is not ModelState.READY:
            if pending is not None and isinstance(pending.exception(), ModelUnavailableError):
                raise pending.exception()  # type: ignore[misc]
            raise served.failed_error()
        if progress is not None:
            progress("load", 1.0)

    # ---- chat ------------------------------------------------------------------------

    @overload
    def chat(
        self, messages: Messages, *, stream: Literal[False] = False, **params: Any
    ) -> ChatCompletion: ...

    @overload
    def chat(
        self, messages: Messages, *, stream: Literal[True], **params: Any
    ) -> ChunkStream[ChatCompletionChunk]: ...

    def chat(
        self, messages: Messages, *, stream: bool = False, **params: Any
    ) -> ChatCompletion | ChunkStream[ChatCompletionChunk]:
        """A chat completion: ``messages`` (a string is one user message) and ``params``,
        the fields of ``POST /v1/chat/completions`` (``max_tokens``, ``temperature``,
        ``seed``, ``stop``, ``n``, ``logprobs``/``top_logprobs``, ``tools``/``tool_choice``,
        ``response_format`` (also a pydantic class: the reply is then a
        :class:`ParsedChatCompletion` with ``message.parsed``), ``keep_alive``...). Content
        lists may hold ``pathlib.Path`` and ``PIL.Image`` images.

        Returns:
            The :class:`ChatCompletion`; with ``stream=True`` a :class:`ChunkStream` of
            ``ChatCompletionChunk`` (checks done, generation queued).

        Raises:
            InvalidRequestError: a refused or malformed field, a prompt the model cannot
                take, a bad image.
            ContextLengthExceededError: prompt tokens + ``max_tokens`` exceed ``n_ctx``.
            QueueFullError: more requests waiting than ``max_queued_requests``.
            ModelUnavailableError: the model is closed, or its context memory filled up
                (``kv_cache_full``; retry).
            InternalServerError: the engine failed mid-generation.
        """
        body, schema = self._chat_request(messages, stream, params)
        if stream:
            return ChunkStream(self._live_portal(), self._call(self._start, self._chat, body))
        return self._reply(self._call(self._complete, self._chat, body), schema)

    async def achat(
        self, messages: Messages, *, stream: bool = False, **params: Any
    ) -> ChatCompletion | AsyncChunkStream[ChatCompletionChunk]:
        """:meth:`chat` on the running asyncio loop (same arguments, replies and errors);
        ``stream=True`` returns an :class:`AsyncChunkStream`."""
        body, schema = self._chat_request(messages, stream, params)
        if stream:
            return AsyncChunkStream(await self._start(self._chat, body))
        return self._reply(await self._complete(self._chat, body), schema)

    def _chat_request(
        self, messages: Messages, stream: bool, params: Mapping[str, Any]
    ) -> tuple[ChatCompletionRequest, type[BaseModel] | None]:
        fields = dict(params)
        schema = None
        if "response_format" in fields:
            fields["response_format"], schema = response_format(fields["response_format"])
        payload = {**fields, "model": self.id, "messages": chat_messages(messages)}
        return validated(ChatCompletionRequest, {**payload, "stream": stream}), schema

    @staticmethod
    def _reply(reply: BaseModel, schema: type[BaseModel] | None) -> ChatCompletion:
        assert isinstance(reply, ChatCompletion)
        return with_parsed(reply, schema) if schema is not None else reply

    # ---- completions -----------------------------------------------------------------

    def complete(
        self, prompt: str | Sequence[str] | Sequence[int], *, stream: bool = False, **params: Any
    ) -> Completion | ChunkStream[Completion]:
        """A text completion of ``prompt`` (a text, texts, or token ids); ``params`` are the
        fields of ``POST /v1/completions`` (``max_tokens`` defaults to 16 there too).

        Returns:
            The :class:`Completion`; with ``stream=True`` a :class:`ChunkStream` of them.

        Raises:
            As :meth:`chat` (no images or response_format here).
        """
        body = self._completion_request(prompt, stream, params)
        if stream:
            running = self._call(self._start, self._completions, body)
            return ChunkStream(self._live_portal(), running)
        reply = self._call(self._complete, self._completions, body)
        assert isinstance(reply, Completion)
        return reply

    async def acomplete(
        self, prompt: str | Sequence[str] | Sequence[int], *, stream: bool = False, **params: Any
    ) -> Completion | AsyncChunkStream[Completion]:
        """:meth:`complete` on the running asyncio loop."""
        body = self._completion_request(prompt, stream, params)
        if stream:
            return AsyncChunkStream(await self._start(self._completions, body))
        reply = await self._complete(self._completions, body)
        assert isinstance(reply, Completion)
        return reply

    def _completion_request(
        self, prompt: Any, stream: bool, params: Mapping[str, Any]
    ) -> CompletionRequest:
        payload = {**params, "model": self.id, "prompt": prompt, "stream": stream}
        return validated(CompletionRequest, payload)

    # ---- embeddings ------------------------------------------------------------------

    def embed(
        self, inputs: str | Sequence[str] | Sequence[int], **params: Any
    ) -> EmbeddingResponse:
        """Embeddings of ``inputs`` (a text, texts, or token ids), one vector per input in
        order; ``params`` are the fields of ``POST /v1/embeddings``. Needs a model loaded
        with ``embeddings=True``.

        Raises:
            InvalidRequestError: the model does not serve embeddings, or a bad input.
            ContextLengthExceededError: an input longer than the model embeds.
        """
        return self._call(self._embed, self._embedding_request(inputs, params))

    async def aembed(
        self, inputs: str | Sequence[str] | Sequence[int], **params: Any
    ) -> EmbeddingResponse:
        """:meth:`embed` on the running asyncio loop."""
        return await self._embed(self._embedding_request(inputs, params))

    def _embedding_request(self, inputs: Any, params: Mapping[str, Any]) -> EmbeddingRequest:
        return validated(EmbeddingRequest, {**params, "model": self.id, "input": inputs})

    async def _embed(self, body: EmbeddingRequest) -> EmbeddingResponse:
        self._live_portal()
        return await create_embeddings(self._registry, self._embeddings, body)

    # ---- the shared path -------------------------------------------------------------

    async def _start(self, service: GenerationService[Any, Any], body: Any) -> Running[Any]:
        self._live_portal()  # the a-methods run on the caller's loop: refuse once closed
        return await start_generation(self._registry, service, body, uuid.uuid4().hex)

    async def _complete(self, service: GenerationService[Any, Any], body: Any) -> BaseModel:
        running = await self._start(service, body)
        try:
            return await running.complete()
        finally:
            running.close()

    def _call(self, func: Callable[..., Any], *args: Any) -> Any:
        """``await func(*args)`` on the model's loop, from this thread; an interrupt here
        (Ctrl-C) cancels it there."""
        future: Future[Any] = self._live_portal().start_task_soon(func, *args)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def _live_portal(self) -> BlockingPortal:
        if self._portal is None:
            raise ModelUnavailableError(f"The model '{self.id}' is closed.", code="closed")
        return self._portal

    # ---- lifetime --------------------------------------------------------------------

    def close(self) -> None:
        """Unload the model and stop its event loop (idempotent). Calls after it, and the
        next step of a synchronous stream still open, raise ``ModelUnavailableError``
        (code ``closed``)."""
        self._portal = None
        self._exit.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Model({self.id!r}, n_ctx={self.entry.n_ctx}, n_parallel={self.entry.n_parallel})"


__all__ = ["Model", "ParsedChatCompletion", "ProgressCallback"]
