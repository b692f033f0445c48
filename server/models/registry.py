"""The served models: every ``models.yaml`` entry (and every catalog model) is available;
models load on start-up (``--model``) or on their first request, and unload when idle.

Life of a model (``ModelState``): ``available`` → ``loading`` → ``ready`` (or
``failed``) → back to ``available`` once unloaded. The rules:

* **Loading** runs on one loader thread, one model at a time; every request for a model
  that is not ready waits on the same load, for at most ``load_timeout_s`` (then 503
  ``model_loading`` with ``Retry-After``; the load goes on and a later request finds the
  model ready). A model that fails to load (bad path, corrupt GGUF, broken template) is
  ``failed``: requests get 503 ``model_load_failed`` until :data:`LOAD_RETRY_S` have
  passed, then the next request tries again. The others keep serving.
* **keep_alive**: each model has an idle time after which it unloads (-1: never; 0: as
  soon as its last request ends). Its value is the last request's ``keep_alive``, else
  the entry's, else forever for start-up models and ``--keep-alive`` (5 min) for the
  rest. The idle clock starts when the last request in flight ends; a model is never
  unloaded while requests use it or wait for it (see :class:`Lease`).
* **Memory budget** (``--max-memory``): before a load, the model's estimate
  (:mod:`ggufserve.models.memory`) must fit beside the loaded ones; idle models are unloaded,
  least recently used first (keep_alive -1 and start-up models included). A model whose
  estimate exceeds the budget on its own gets 503 ``model_too_large``; one that would
  fit once busy models go idle gets 503 ``insufficient_memory`` with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from ggufserve.api.wire import FOREVER
from ggufserve.errors import ModelNotFoundError
from ggufserve.models.catalog import ModelCatalog
from ggufserve.models.loader import Loader, LoaderContext
from ggufserve.models.served_model import LOAD_RETRY_S, Lease, ModelState, ServedModel
from ggufserve.settings import ModelEntry, ModelsFileError, ServerSettings

log = logging.getLogger(__name__)

# Clients such as mistral.rs examples send model="default"; it names the default model.
DEFAULT_ALIAS = "default"
__all__ = ["DEFAULT_ALIAS", "LOAD_RETRY_S", "Lease", "ModelRegistry", "ModelState", "ServedModel"]


class ModelRegistry:
    """Knows every servable model, loads and unloads them (see the module docstring).

    Args:
        entries: The ``models.yaml`` entries (every one is available).
        base_dir: Folder of ``models.yaml`` (relative paths resolve against it).
        settings: Server settings (queue size, template bounds, keep_alive, budget).
        catalog: More models (the local store); ``models.yaml`` ids win over its ids.
        preload: Ids loaded at start-up, the first being the default (``model="default"``);
            None loads every entry.

    Raises:
        ModelsFileError: a ``preload`` id is neither an entry nor in the catalog.
    """

    def __init__(
        self,
        entries: list[ModelEntry],
        base_dir: Path,
        settings: ServerSettings,
        catalog: ModelCatalog | None = None,
        preload: list[str] | None = None,
    ):
        self._settings = settings
        self._catalog = catalog
        self._base_dir = base_dir
        self._models = {e.id: ServedModel(e, base_dir) for e in entries}
        startup_ids = [e.id for e in entries] if preload is None else list(preload)
        self._default_id = startup_ids[0] if startup_ids else next(iter(self._models), None)
        self.stats: Counter[str] = Counter()
        self.lock = threading.Lock()
        self._loader = Loader(
            LoaderContext(
                lock=self.lock,
                settings=settings,
                models=self.known,
                default_keep_alive=self.default_keep_alive,
                hold_files=self._hold_files,
                stats=self.stats,
            )
        )
        for model_id in startup_ids:
            served = self._lookup(model_id)
            if served is None:
                raise ModelsFileError(f"no model '{model_id}' in the models file or the store")
            served.startup = True
        for served in self._models.values():
            served.keep_alive_s = self.default_keep_alive(served)

    @property
    def settings(self) -> ServerSettings:
        return self._settings

    @property
    def catalog(self) -> ModelCatalog | None:
        return self._catalog

    # ---- start-up and shutdown ------------------------------------------------------

    def start_loading(self) -> None:
        """Start the loader thread and queue the start-up models' loads."""
        self._loader.start()
        with self.lock:
            for served in self.startup_models():
                self._loader.schedule(served)

    def wait_loaded(self, timeout_s: float | None = None) -> None:
        """Block until every start-up model's first load has ended (tests, benchmarks)."""
        pending = [m.loading for m in self.startup_models() if m.loading is not None]
        concurrent.futures.wait(pending, timeout_s)

    def close(self) -> None:
        """Stop the loader (queued loads fail with ``draining``), unload every model."""
        self._loader.stop()

    # ---- lookups --------------------------------------------------------------------

    def models(self) -> list[ServedModel]:
        """Every servable model: ``models.yaml``'s, then the catalog's (and catalog models
        still loaded after leaving the catalog)."""
        offered = self._catalog_entries()
        with self.lock:
            if self._catalog is not None:
                self._merge_catalog(offered)
            return list(self._models.values())

    def known(self) -> list[ServedModel]:
        """Every model seen so far, without asking the catalog (the loader, under the lock)."""
        return list(self._models.values())

    def startup_models(self) -> list[ServedModel]:
        return [m for m in self._models.values() if m.startup]

    def loaded(self) -> list[ServedModel]:
        with self.lock:
            return [m for m in self._models.values() if m.state is ModelState.READY]

    def lookup(self, model_id: str) -> ServedModel:
        """The model with this id, loaded or not (``default`` names the default model).

        Raises:
            ModelNotFoundError: neither ``models.yaml`` nor the catalog has it.
        """
        served = self._lookup(model_id)
        if served is None:
            raise ModelNotFoundError(model_id)
        return served

    def _lookup(self, model_id: str) -> ServedModel | None:
        key = self._default_id if model_id == DEFAULT_ALIAS else model_id
        if key is None:
            return None
        served = self._models.get(key)
        if served is None and self._catalog is not None:
            offered = self._catalog_entries()
            with self.lock:
                self._merge_catalog(offered)
                served = self._models.get(key)
        return served

    def _catalog_entries(self) -> list[ModelEntry]:
        if self._catalog is None:
            return []
        try:
            return self._catalog.entries()
        except Exception:
            log.exception("the model catalog could not list its models")
            return []

    def _merge_catalog(self, offered: list[ModelEntry]) -> None:
        """Add new catalog models; drop idle unloaded ones the catalog no longer offers."""
        ids = {e.id for e in offered}
        for model_id, served in list(self._models.items()):
            gone = served.from_catalog and model_id not in ids
            unused = not served.in_flight and served.loading is None
            if gone and unused and served.state is not ModelState.READY:
                del self._models[model_id]
        for entry in offered:
            if entry.id not in self._models:
                served = ServedModel(entry, self._base_dir)
                served.from_catalog = True
                served.keep_alive_s = self.default_keep_alive(served)
                self._models[entry.id] = served

    def _hold_files(self, served: ServedModel) -> Callable[[], None]:
        """Keep the store from removing a catalog model's files while it is loaded."""
        if not served.from_catalog or self._catalog is None:
            return lambda: None
        return self._catalog.hold(served.id)

    def default_keep_alive(self, served: ServedModel) -> float:
        """The entry's keep_alive, else forever for start-up models, else the server's."""
        if served.entry.keep_alive is not None:
            return served.entry.keep_alive
        return FOREVER if served.startup else self._settings.keep_alive

    # ---- requests -------------------------------------------------------------------

    async def acquire(self, model_id: str, keep_alive_s: float | None = None) -> Lease:
        """Wait until the model is ready (loading it if needed) and lease it.

        Args:
            model_id: The requested id (``default`` allowed).
            keep_alive_s: The request's ``keep_alive`` (None: the model's default); it
                becomes the model's idle limit (the last request's value wins).

        Raises:
            ModelNotFoundError: unknown id.
            ModelUnavailableError: still loading after ``load_timeout_s``
                (``model_loading``), failed to load (``model_load_failed``), too large
                for the budget (``model_too_large``), no room beside busy models
                (``insufficient_memory``), or the server is shutting down (``draining``).
        """
        served = self.lookup(model_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.load_timeout_s
        with self.lock:
            if self._models.get(served.id) is not served:  # left the catalog meanwhile
                raise ModelNotFoundError(model_id)
            served.in_flight += 1
        try:
            while True:
                with self.lock:
                    if served.state is ModelState.READY and served.parts is not None:
                        default = self.default_keep_alive(served)
                        served.keep_alive_s = default if keep_alive_s is None else keep_alive_s
                        return Lease(served, served.parts, lambda: self._release(served, used=True))
                    pending = self._loader.request_load(served)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise served.loading_error()
                try:
                    await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(pending)), remaining)
                except asyncio.TimeoutError:
                    raise served.loading_error() from None
        except BaseException:
            self._release(served, used=False)
            raise

    def _release(self, served: ServedModel, *, used: bool) -> None:
        with self.lock:
            served.in_flight -= 1
            if used:
                served.last_used = time.monotonic()
            if served.in_flight == 0 and served.keep_alive_s == 0:
                self._loader.wake()
