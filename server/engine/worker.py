"""One owner thread per llama.cpp context, fed by a bounded FIFO queue, bridged to asyncio.

A llama.cpp context is not thread-safe, so exactly one thread ever touches it. Requests
wait their turn in FIFO order; a waiting request never interrupts the running one. The
event loop only ever awaits an ``asyncio.Queue`` filled from the worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

from server.engine.base import Failed, Finished, GenerationEvent, GenerationRequest

log = logging.getLogger(__name__)


class EngineBusy(Exception):
    """The queue is full. ``retry_after_s`` estimates when a slot frees up, in seconds."""

    def __init__(self, retry_after_s: int):
        super().__init__("queue full")
        self.retry_after_s = retry_after_s


class EngineClosed(Exception):
    """The engine is shutting down and takes no new work."""


class Generation:
    """Handle on one submitted job: the worker emits events, the event loop iterates them.

    Args:
        request: What to generate.
        loop: The event loop that consumes the events.
    """

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop):
        self.request = request
        self._loop = loop
        self._events: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        """True once the consumer has gone away; the worker stops at the next token."""
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Ask the worker to stop (or to skip the job if it has not started)."""
        self._cancelled.set()

    def emit(self, event: GenerationEvent) -> None:
        """Called from the worker thread."""
        # The loop may be closed during shutdown; the consumer is gone then anyway.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    async def events(self) -> AsyncIterator[GenerationEvent]:
        """Events up to and including the final ``Finished`` or ``Failed``."""
        while True:
            event = await self._events.get()
            yield event
            if isinstance(event, (Finished, Failed)):
                return


class Worker:
    """Runs jobs one at a time on its own thread.

    Args:
        run: Executes one job on the worker thread, emitting its events.
        max_queued: Jobs allowed to wait behind the running one; more → :class:`EngineBusy`.
        name: Thread name, for logs.
    """

    def __init__(self, run: Callable[[Generation], None], *, max_queued: int, name: str):
        self._run = run
        self._max_queued = max_queued
        self._jobs: deque[Generation] = deque()
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self._mean_job_s = 5.0
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, generation: Generation) -> None:
        """Queue a job.

        Raises:
            EngineBusy: ``max_queued`` jobs are already waiting.
            EngineClosed: the worker is shutting down.
        """
        with self._cond:
            if self._closed:
                raise EngineClosed()
            waiting = sum(1 for job in self._jobs if not job.cancelled)
            if self._busy and waiting >= self._max_queued:
                raise EngineBusy(math.ceil(self._mean_job_s * (waiting + 1)))
            self._jobs.append(generation)
            self._cond.notify()

    def depth(self) -> int:
        """Jobs waiting plus the one running."""
        with self._cond:
            return len(self._jobs) + int(self._busy)

    def close(self, timeout_s: float = 10.0) -> None:
        """Cancel waiting jobs, let the running one see its cancellation, join the thread."""
        with self._cond:
            self._closed = True
            for job in self._jobs:
                job.cancel()
                job.emit(Failed())
            self._jobs.clear()
            self._cond.notify_all()
        self._thread.join(timeout_s)

    def _next_job(self) -> Generation | None:
        with self._cond:
            while not self._jobs and not self._closed:
                self._cond.wait()
            if not self._jobs:
                return None
            self._busy = True
            return self._jobs.popleft()

    def _serve(self) -> None:
        while (job := self._next_job()) is not None:
            started = time.monotonic()
            try:
                if not job.cancelled:
                    self._run(job)
            except Exception:
                log.exception("generation failed")
                job.emit(Failed())
            finally:
                elapsed = time.monotonic() - started
                with self._cond:
                    self._busy = False
                    self._mean_job_s = 0.8 * self._mean_job_s + 0.2 * elapsed
