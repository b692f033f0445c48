"""The bridge between the engine's owner thread and asyncio: a :class:`Generation` per
request, whose events the owner thread emits and the event loop awaits (never blocking)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator

from ggufserve.engine.base import (
    Failed,
    Finished,
    GenerationEvent,
    GenerationRequest,
    Histogram,
)

log = logging.getLogger(__name__)

# Upper bounds of the scheduler step histogram, seconds (a step is ~1 ms to seconds).
STEP_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class StepClock:
    """When the owner thread's current scheduler step began and how long steps took, for
    liveness (``/health``) and metrics. Written by the owner thread, read anywhere."""

    def __init__(self) -> None:
        self.durations = Histogram(STEP_BUCKETS_S, [0] * (len(STEP_BUCKETS_S) + 1))
        self._started_at: float | None = None

    def start(self) -> None:
        self._started_at = time.monotonic()

    def stop(self) -> None:
        started, self._started_at = self._started_at, None
        if started is not None:
            self.durations.observe(time.monotonic() - started)

    def age_s(self) -> float:
        """Seconds the current step has run (0 between steps)."""
        started = self._started_at
        return 0.0 if started is None else time.monotonic() - started


class EngineBusy(Exception):
    """The queue is full. ``retry_after_s`` estimates when a slot frees up, in seconds."""

    def __init__(self, retry_after_s: int):
        super().__init__("queue full")
        self.retry_after_s = retry_after_s


class EngineClosed(Exception):
    """The engine is shutting down and takes no new work."""


class Generation:
    """Handle on one submitted job: the owner thread emits events, the event loop iterates them.

    Args:
        request: What to generate.
        loop: The event loop that consumes the events.
        leader: For the 2nd..n-th choices of one request: the first choice's generation.
            This one is admitted only once the leader's prompt is in the KV cache, so it
            copies those cells (``seq_cp``) instead of decoding the prompt again.
    """

    def __init__(
        self,
        request: GenerationRequest,
        loop: asyncio.AbstractEventLoop,
        leader: Generation | None = None,
    ):
        self.request = request
        self.leader = leader
        # Owner thread only: the prompt is cached (or the leader ended), followers may go.
        self.prompt_cached = False
        self._loop = loop
        self._events: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        self._cancelled = threading.Event()
        self.submitted_at = time.monotonic()

    @property
    def cancelled(self) -> bool:
        """True once the consumer has gone away; generation stops at the next step."""
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Ask the owner thread to stop (or to skip the job if it has not started)."""
        self._cancelled.set()

    def emit(self, event: GenerationEvent) -> None:
        """Called from the engine's owner thread."""
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
