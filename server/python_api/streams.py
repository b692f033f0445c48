"""A streamed reply as an iterator of chunk models: :class:`ChunkStream` for threads (each
step runs on the model's event loop through its blocking portal), :class:`AsyncChunkStream`
on the caller's loop. Leaving early (``break`` then garbage collection, ``close()``, the
``with`` block) cancels the generation and releases the model's lease."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from types import TracebackType
from typing import Any, Generic, TypeVar

from anyio.from_thread import BlockingPortal

from ggufserve.errors import ModelUnavailableError
from ggufserve.generation.requests import Running

T = TypeVar("T")
_END = object()


class ChunkStream(Generic[T]):
    """The chunks of one streamed reply (``ChatCompletionChunk`` or ``Completion``), for
    synchronous code; a context manager whose exit calls :meth:`close`.

    Iteration raises the ``APIError`` of a generation that fails mid-way (e.g.
    ``ModelUnavailableError`` ``kv_cache_full``) after the chunks sent before it, and
    ``ModelUnavailableError`` (code ``closed``) at the first step after ``Model.close()``.
    """

    def __init__(self, portal: BlockingPortal, running: Running[Any]):
        self._portal = portal
        self._running = running
        self._chunks: AsyncGenerator[Any, None] = running.chunks()
        self._closed = False

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        if self._closed:
            raise StopIteration
        try:
            future = self._portal.start_task_soon(self._step)
        except RuntimeError:  # the portal stopped: Model.close() ended the model's loop
            self.close()
            raise ModelUnavailableError(
                "The model is closed; its open streams ended with it.", code="closed"
            ) from None
        try:
            chunk = future.result()
        except BaseException:
            future.cancel()
            self.close()
            raise
        if chunk is _END:
            self.close()
            raise StopIteration
        return chunk

    async def _step(self) -> Any:
        try:
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            return _END

    def close(self) -> None:
        """Stop the generation (a no-op once it has ended) and release the lease."""
        if self._closed:
            return
        self._closed = True
        try:  # from the portal's own thread (a collection there) it cannot be awaited
            with contextlib.suppress(RuntimeError):
                self._portal.call(self._chunks.aclose)
        finally:
            self._running.close()

    def __enter__(self) -> ChunkStream[T]:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class AsyncChunkStream(Generic[T]):
    """:class:`ChunkStream` for ``async for`` on the caller's event loop; an async context
    manager whose exit calls :meth:`aclose`."""

    def __init__(self, running: Running[Any]):
        self._running = running
        self._chunks: AsyncGenerator[Any, None] = running.chunks()
        self._closed = False

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        if self._closed:
            raise StopAsyncIteration
        try:
            return await self._chunks.__anext__()
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        """Stop the generation (a no-op once it has ended) and release the lease."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._chunks.aclose()
        finally:
            self._running.close()

    async def __aenter__(self) -> AsyncChunkStream[T]:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # Not awaited here: the loop's async-generator hook closes the chunk generator.
        if not self._closed:
            self._closed = True
            self._running.close()
