"""One servable model and its lifecycle fields (see :mod:`ggufserve.models.registry`)."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from ggufserve.api.wire import FOREVER
from ggufserve.errors import ModelUnavailableError
from ggufserve.models.loading import LoadedParts
from ggufserve.settings import ModelEntry

# A failed load is retried by the first request after this many seconds.
LOAD_RETRY_S = 30.0
# Retry-After for a request that gave up waiting for its model's load.
LOADING_RETRY_AFTER_S = 5


class ModelState(str, enum.Enum):
    AVAILABLE = "available"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass
class ServedModel:
    """One served entry (``models.yaml`` or catalog) and, while loaded, its ``parts``
    (engine, chat templates, tool family, embedding engine: :class:`LoadedParts`; None
    while not loaded). ``serves_tools``: the last load found a tool-call family (kept
    after unloading: ``/v1/models`` lists the capability).

    The lifecycle fields are guarded by the registry's lock: ``in_flight`` counts the
    requests using the model or waiting for it to load; ``last_used`` (monotonic) is when
    the last of them ended; ``keep_alive_s`` its current idle limit (-1: never unloaded
    for idleness); ``memory_bytes`` the estimate, once the model has been sized.
    """

    entry: ModelEntry
    base_dir: Path
    created: int = field(default_factory=lambda: int(time.time()))
    state: ModelState = ModelState.AVAILABLE
    parts: LoadedParts | None = None
    serves_tools: bool = False
    startup: bool = False
    from_catalog: bool = False
    # The first load attempt of a start-up model has ended (/health waits for it).
    settled: bool = False
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)
    keep_alive_s: float = FOREVER
    memory_bytes: int | None = None
    # llama.cpp's loaded fraction of the weights during the latest load (0..1).
    load_progress: float | None = None
    failed_at: float | None = None
    loading: Future[None] | None = None
    release_files: Callable[[], None] | None = None

    @property
    def id(self) -> str:
        return self.entry.id

    def idle_s(self, now: float | None = None) -> float | None:
        """Seconds since the last request ended (loaded and idle), else None."""
        if self.state is not ModelState.READY or self.in_flight:
            return None
        return max(0.0, (now or time.monotonic()) - self.last_used)

    def expires_in(self, now: float | None = None) -> float | None:
        """Seconds until the keep_alive unload (loaded, idle, finite), else None."""
        idle = self.idle_s(now)
        if idle is None or self.keep_alive_s < 0:
            return None
        return max(0.0, self.keep_alive_s - idle)

    def expires_at(self) -> float | None:
        """Unix time (s) of the keep_alive unload, else None."""
        remaining = self.expires_in()
        return None if remaining is None else time.time() + remaining

    def attach(self, parts: LoadedParts) -> None:
        self.parts, self.serves_tools = parts, parts.family is not None

    def detach(self) -> tuple[LoadedParts | None, Callable[[], None] | None]:
        """Forget the loaded parts (state ``available``); the caller frees them."""
        out = (self.parts, self.release_files)
        self.parts = self.release_files = None
        self.state = ModelState.AVAILABLE
        return out

    def loading_error(self) -> ModelUnavailableError:
        return ModelUnavailableError(
            f"The model '{self.id}' is still loading; retry shortly.",
            code="model_loading",
            retry_after_s=LOADING_RETRY_AFTER_S,
        )

    def failed_error(self) -> ModelUnavailableError:
        waited = time.monotonic() - (self.failed_at or 0.0)
        return ModelUnavailableError(
            f"The model '{self.id}' failed to load; see the server log.",
            code="model_load_failed",
            retry_after_s=max(1, int(LOAD_RETRY_S - waited + 0.999)),
        )


class Lease:
    """A request's hold on a ready model: ``served`` (its entry and id) and ``parts``, the
    loaded engine and templates as they were when the lease was taken. The model is not
    unloaded until every lease on it is released (idempotent). Release it when the response
    has been sent, for a stream when its last event is out.

    Args:
        served: The leased model.
        parts: Its loaded parts.
        on_release: Called once, by the first :meth:`release`.
    """

    def __init__(self, served: ServedModel, parts: LoadedParts, on_release: Callable[[], None]):
        self.served = served
        self.parts = parts
        self._on_release: Callable[[], None] | None = on_release

    def release(self) -> None:
        on_release, self._on_release = self._on_release, None
        if on_release is not None:
            on_release()
