"""The registry's loader thread: loads models one at a time, makes room under the memory
budget, and unloads models whose keep_alive has run out (checked every
:data:`TICK_S`). Rules: see :mod:`ggufserve.models.registry`.

Every load and unload happens on this one thread, so the memory accounting (the loaded
models' estimates) never races a second load. State changes happen under the lock its
owner shares (:class:`LoaderContext`); blocking work (resolving files, llama.cpp loads,
freeing) outside it. The loader knows its owner only through that context.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from ggufserve.engine.base import ModelLoadError
from ggufserve.errors import InsufficientMemoryError, ModelTooLargeError, ModelUnavailableError
from ggufserve.generation.templates import ChatTemplateError
from ggufserve.models.heap import settle_heap
from ggufserve.models.loading import LoadedParts, draft_path, load_parts, model_paths
from ggufserve.models.memory import Resident, estimate_bytes, mib, plan_eviction
from ggufserve.models.served_model import LOAD_RETRY_S, ModelState, ServedModel
from ggufserve.settings import ModelsFileError, ServerSettings

log = logging.getLogger(__name__)

# Seconds between keep_alive checks.
TICK_S = 1.0
# How long shutdown waits for a load in progress before leaving it to its daemon thread.
STOP_WAIT_S = 120.0


def _draining() -> ModelUnavailableError:
    return ModelUnavailableError("The server is shutting down.", code="draining")


def _settle(future: Future[None], error: BaseException | None = None) -> None:
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


@dataclass(frozen=True)
class LoaderContext:
    """What the loader may see and change of its owner's models.

    Attributes:
        lock: Guards every model's lifecycle fields (the owner's and the loader's).
        settings: Server settings (memory budget, queue size, template bounds).
        models: Every model seen so far (called with ``lock`` held).
        default_keep_alive: A model's keep_alive once it is unloaded (seconds, -1 forever).
        hold_files: Pins a model's files while it is loaded (e.g. against the store's
            removal); returns the function that lets them go.
        stats: Counters the loader adds to (``loads``, ``load_failures``,
            ``unloads_<reason>``), under ``lock``.
    """

    lock: threading.Lock
    settings: ServerSettings
    models: Callable[[], list[ServedModel]]
    default_keep_alive: Callable[[ServedModel], float]
    hold_files: Callable[[ServedModel], Callable[[], None]]
    stats: Counter[str]


class Loader:
    """Owns the loader thread; ``context`` is all it knows of the models' owner."""

    def __init__(self, context: LoaderContext):
        self._context = context
        self.lock = context.lock
        self._queue: queue.SimpleQueue[ServedModel | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        # A load or unload happened: settle the heap once the step's frames let go of it.
        self._heap_changed = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="model-loader", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Have the thread check keep_alive now (a model with keep_alive 0 went idle)."""
        self._queue.put(None)

    # ---- called with the lock held --------------------------------------------------

    def schedule(self, served: ServedModel) -> Future[None]:
        """Queue a load of ``served`` (state ``loading``); the future ends with it."""
        future: Future[None] = Future()
        served.loading = future
        served.state = ModelState.LOADING
        self._queue.put(served)
        return future

    def request_load(self, served: ServedModel) -> Future[None]:
        """The load a request for a not-ready model waits on: the one under way, or a
        new one.

        Raises:
            ModelUnavailableError: the model failed to load less than ``LOAD_RETRY_S``
                ago (``model_load_failed``), is known not to fit the budget
                (``model_too_large``), or the server is shutting down (``draining``).
        """
        if self._stopping.is_set():
            raise _draining()
        if served.state is ModelState.LOADING and served.loading is not None:
            return served.loading
        failed_at = served.failed_at
        recent = failed_at is not None and time.monotonic() - failed_at < LOAD_RETRY_S
        if served.state is ModelState.FAILED and recent:
            raise served.failed_error()
        budget = self._context.settings.max_memory
        if budget is not None and (served.memory_bytes or 0) > budget:
            raise self._too_large(served, budget)
        return self.schedule(served)

    # ---- the thread -----------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                item = self._queue.get(timeout=TICK_S)
            except queue.Empty:
                item = None
            if self._stopping.is_set():
                break
            try:
                if item is not None:
                    self._load(item)
                self._expire()
            except Exception:  # the thread must outlive any one model's trouble
                log.exception("the model loader hit an unexpected error")
            if self._heap_changed:
                self._heap_changed = False
                settle_heap()

    def _load(self, served: ServedModel) -> None:
        future = served.loading
        if future is None:  # shutdown cancelled it
            return
        started = time.monotonic()
        try:
            parts, release = self._load_parts(served)
        except ModelUnavailableError as exc:  # does not fit the budget: not a failure
            log.warning("%s", exc.message)
            with self.lock:
                served.state, served.loading, served.settled = ModelState.AVAILABLE, None, True
            _settle(future, exc)
            return
        except (ModelsFileError, ModelLoadError, ChatTemplateError, OSError) as exc:
            log.error("model '%s' failed to load: %s", served.id, exc)
            self._failed(served, future)
            return
        except Exception:
            log.exception("model '%s' failed to load", served.id)
            self._failed(served, future)
            return
        with self.lock:
            stopping = self._stopping.is_set()
            if not stopping:
                served.attach(parts)
                served.release_files = release
                served.state, served.loading, served.settled = ModelState.READY, None, True
                served.failed_at = None
                served.last_used = time.monotonic()
                self._context.stats["loads"] += 1
        if stopping:
            self._free(served, (parts, release), "shutdown")
            _settle(future, _draining())
            return
        log.info(
            "model '%s' ready in %.1f s (about %s)",
            served.id,
            time.monotonic() - started,
            mib(served.memory_bytes or 0),
        )
        self._heap_changed = True
        _settle(future)

    def _load_parts(self, served: ServedModel) -> tuple[LoadedParts, Callable[[], None]]:
        """Resolve, size, make room, hold the files, load.

        Raises:
            ModelUnavailableError: too large, or no room beside busy models.
            ModelsFileError / ModelLoadError / ChatTemplateError / OSError: a failed load.
        """
        entry = served.entry
        paths = model_paths(entry, served.base_dir)
        draft = draft_path(entry, served.base_dir)
        if served.memory_bytes is None:
            served.memory_bytes = estimate_bytes(
                *paths,
                n_ctx=entry.n_ctx,
                type_k=entry.cache_type_k,
                type_v=entry.cache_type_v,
                embeddings=entry.embeddings,
                draft=draft,
            )
        self._make_room(served)
        release = self._context.hold_files(served)
        try:
            progress = LoadProgress(served, log)
            settings = self._context.settings
            parts = load_parts(entry, served.base_dir, paths, settings, progress, draft)
            return parts, release
        except BaseException:
            release()
            raise

    def _failed(self, served: ServedModel, future: Future[None]) -> None:
        with self.lock:
            served.state, served.loading, served.settled = ModelState.FAILED, None, True
            served.failed_at = time.monotonic()
            self._context.stats["load_failures"] += 1
            error = served.failed_error()
        _settle(future, error)

    def _too_large(self, served: ServedModel, budget: int) -> ModelTooLargeError:
        return ModelTooLargeError(
            f"The model '{served.id}' needs about {mib(served.memory_bytes or 0)} (estimate), "
            f"more than the memory budget of {mib(budget)} (--max-memory); it cannot be "
            "loaded on this server."
        )

    def _make_room(self, served: ServedModel) -> None:
        """Unload idle models, least recently used first, until ``served`` fits.

        Raises:
            ModelTooLargeError: its estimate exceeds the budget on its own.
            InsufficientMemoryError: busy models hold too much of the budget.
        """
        budget = self._context.settings.max_memory
        need = served.memory_bytes or 0
        if budget is None:
            return
        if need > budget:
            raise self._too_large(served, budget)
        with self.lock:
            loaded = [
                m for m in self._context.models() if m.state is ModelState.READY and m is not served
            ]
            residents = [
                Resident(m.id, m.memory_bytes or 0, m.in_flight > 0, m.last_used) for m in loaded
            ]
            victims = plan_eviction(need, budget, residents)
            if victims is None:
                busy = sum(r.memory_bytes for r in residents if r.busy)
                raise InsufficientMemoryError(
                    f"The model '{served.id}' needs about {mib(need)} (estimate); the memory "
                    f"budget is {mib(budget)} (--max-memory) and models busy with requests "
                    f"hold {mib(busy)} of it. Retry when they finish."
                )
            doomed = [(m, m.detach()) for m in loaded if m.id in victims]
        for model, parts in doomed:
            self._free(model, parts, "memory")

    def _expire(self) -> None:
        """Unload loaded models idle for longer than their keep_alive."""
        now = time.monotonic()
        with self.lock:
            doomed = [
                (m, m.detach())
                for m in self._context.models()
                if m.state is ModelState.READY
                and not m.in_flight
                and m.keep_alive_s >= 0
                and now - m.last_used >= m.keep_alive_s
            ]
        for model, parts in doomed:
            self._free(model, parts, "keep_alive")

    def _free(
        self,
        served: ServedModel,
        detached: tuple[LoadedParts | None, Callable[[], None] | None],
        reason: str,
    ) -> None:
        parts, release = detached
        try:
            if parts is not None:
                parts.close()
        except Exception:
            log.exception("model '%s' did not unload cleanly", served.id)
        finally:
            if release is not None:
                release()
        self._heap_changed = True
        with self.lock:
            # A later load starts from the default: a last request's keep_alive 0 would
            # otherwise unload it before a client that did not wait for the load returns.
            served.keep_alive_s = self._context.default_keep_alive(served)
            self._context.stats[f"unloads_{reason}"] += 1
        log.info("model '%s' unloaded (%s)", served.id, reason.replace("_", " "))

    # ---- shutdown -------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the thread, fail queued loads (``draining``), unload every model."""
        self._stopping.set()
        self.wake()
        if self._thread is not None:
            self._thread.join(STOP_WAIT_S)
        with self.lock:
            known = self._context.models()
            waiting = [m for m in known if m.loading is not None]
            for served in waiting:
                if served.state is ModelState.LOADING:
                    served.state = ModelState.AVAILABLE
            futures = [m.loading for m in waiting]
            for served in waiting:
                served.loading = None
            doomed = [(m, m.detach()) for m in known if m.state is ModelState.READY]
        for future in futures:
            if future is not None:
                _settle(future, _draining())
        for model, parts in doomed:
            self._free(model, parts, "shutdown")


class LoadProgress:
    """Receives llama.cpp's load fraction: kept on the model for ``/v1/models`` (the
    terminal chat's bar) and logged at each quarter (one plain line each)."""

    def __init__(self, served: ServedModel, logger: logging.Logger):
        self.served, self.logger, self.next_quarter = served, logger, 0.25
        served.load_progress = 0.0

    def __call__(self, fraction: float) -> None:
        self.served.load_progress = fraction
        if fraction >= self.next_quarter:
            self.logger.info("model '%s' loading: %.0f%%", self.served.id, 100 * fraction)
            self.next_quarter = (int(fraction * 4) + 1) / 4
