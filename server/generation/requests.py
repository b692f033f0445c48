"""One parsed request → a running generation or an embedding response: the path shared by
the HTTP routes (:mod:`ggufserve.api.routes`) and the in-process Python API
(:mod:`ggufserve.python_api`), so that both check, lease, load on demand and queue alike.

Order: look the model up (an unknown id fails before anything else) → the model-free
checks in a worker thread (a bad request never waits for a load) → lease the model
(loading it if needed) → prepare (render, tokenize, grammar) → queue on the engine. The
lease is released on every failure; on success the returned :class:`Running` holds it
until :meth:`Running.close`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import anyio.to_thread
from pydantic import BaseModel

from ggufserve.engine.worker import Generation
from ggufserve.errors import InvalidRequestError
from ggufserve.generation.embeddings import EmbeddingRequest, EmbeddingResponse, EmbeddingService
from ggufserve.generation.streaming import StreamWriter, chunk_stream
from ggufserve.models.registry import Lease, ModelRegistry

C = TypeVar("C")
P = TypeVar("P")


class GenerationService(Protocol[C, P]):
    """What the chat and text completions services offer (``C``: a request that passed the
    model-free checks, ``P``: a prepared request)."""

    def check(self, body: Any) -> C: ...

    async def prepare(self, checked: C, lease: Lease, request_id: str) -> P: ...

    def start(self, prepared: P) -> list[Generation]: ...

    def stream(
        self, prepared: P, generations: list[Generation], request_id: str
    ) -> AsyncIterator[str]: ...

    async def complete(
        self, prepared: P, generations: list[Generation], request_id: str
    ) -> BaseModel: ...


class WriterService(GenerationService[C, P], Protocol):
    """A service whose stream is a :class:`StreamWriter`'s chunks (chat, completions)."""

    def writer(self, prepared: P, generations: list[Generation]) -> StreamWriter: ...


class GeneratedRequest(Protocol):
    """The fields of a parsed generation request this layer reads."""

    model: str
    keep_alive: float | None


@dataclass
class Running(Generic[P]):
    """A queued request: its service, prepared form, one generation per choice and the
    model's lease, held until :meth:`close` (idempotent: cancels the generations, a no-op
    for finished ones, and releases the lease)."""

    service: GenerationService[Any, P]
    prepared: P
    generations: list[Generation]
    lease: Lease
    request_id: str

    async def complete(self) -> BaseModel:
        """Every choice run to its end: the reply model (e.g. ``ChatCompletion``).

        Raises:
            APIError: the engine failed (see :func:`ggufserve.generation.streaming.failure`).
        """
        return await self.service.complete(self.prepared, self.generations, self.request_id)

    def sse(self) -> AsyncIterator[str]:
        """The reply as server-sent events (the service's stream)."""
        return self.service.stream(self.prepared, self.generations, self.request_id)

    def chunks(self) -> AsyncGenerator[BaseModel, None]:
        """The reply's chunk models (see :func:`ggufserve.generation.streaming.chunk_stream`).

        Raises:
            TypeError: the service streams only SSE text (no ``writer``).
        """
        writer = getattr(self.service, "writer", None)
        if writer is None:
            raise TypeError(f"{type(self.service).__name__} has no chunk writer")
        return chunk_stream(
            self.generations, self.request_id, writer(self.prepared, self.generations)
        )

    def close(self) -> None:
        for generation in self.generations:
            generation.cancel()
        self.lease.release()


async def start_generation(
    registry: ModelRegistry,
    service: GenerationService[Any, P],
    body: GeneratedRequest,
    request_id: str,
) -> Running[P]:
    """Check, lease (loading on demand), prepare and queue ``body``.

    Raises:
        ModelNotFoundError: unknown ``body.model``.
        InvalidRequestError / ContextLengthExceededError: the service's checks.
        ModelUnavailableError: the model cannot be loaded or the engine is shutting down.
        QueueFullError: the model's queue is full.
    """
    registry.lookup(body.model)  # an unknown id is a 404 before any other error
    checked = await anyio.to_thread.run_sync(service.check, body)
    lease = await registry.acquire(body.model, body.keep_alive)
    try:
        prepared = await service.prepare(checked, lease, request_id)
        generations = service.start(prepared)
    except BaseException:
        lease.release()
        raise
    return Running(service, prepared, generations, lease, request_id)


async def create_embeddings(
    registry: ModelRegistry, service: EmbeddingService, body: EmbeddingRequest
) -> EmbeddingResponse:
    """Embed ``body``'s inputs on its model (loaded on demand; the lease is released once
    the vectors are computed).

    Raises:
        ModelNotFoundError: unknown ``body.model``.
        InvalidRequestError: the model does not serve embeddings, or a bad input (see
            :meth:`EmbeddingService.check` and :meth:`EmbeddingService.create`).
        ContextLengthExceededError: an input longer than the model embeds.
        ModelUnavailableError: the model cannot be loaded.
    """
    if not registry.lookup(body.model).entry.embeddings:
        raise no_embeddings(body.model)
    items = service.check(body)
    lease = await registry.acquire(body.model, body.keep_alive)
    try:
        engine, embedder = lease.parts.engine, lease.parts.embedder
        if embedder is None:  # the entry asks for embeddings: never, but mypy cannot tell
            raise no_embeddings(body.model)
        return await service.create(
            body,
            items,
            engine=embedder,
            tokenize=engine.tokenize,
            add_bos=engine.info.add_bos,
            bos_token_id=engine.info.bos_token_id,
            n_vocab=engine.info.n_vocab,
            model_id=lease.served.id,
        )
    finally:
        lease.release()


def no_embeddings(model_id: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"The model '{model_id}' does not serve embeddings (models.yaml: embeddings).",
        param="model",
    )
