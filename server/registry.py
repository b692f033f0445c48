"""The served models: loaded in the background at start-up, each independently.

A model that fails to load (bad path, corrupt GGUF, broken template) is marked failed and
logged; the others keep serving. Requests for a model that is not ready get 503.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from server.engine.base import ModelLoadError
from server.engine.embedding import EmbeddingEngine
from server.engine.llama import LlamaEngine
from server.errors import ModelNotFoundError, ModelUnavailableError
from server.families import family_for
from server.families.base import Family
from server.model_files import resolve
from server.settings import ModelEntry, ModelsFileError, ServerSettings
from server.templates import ChatTemplate, ChatTemplateError, fallback_template, shipped_template

log = logging.getLogger(__name__)

# Clients such as mistral.rs examples send model="default"; it names the default model.
DEFAULT_ALIAS = "default"


class ModelState(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass
class ServedModel:
    """One ``models.yaml`` entry and, once loaded, its engine and chat templates.

    ``tool_template`` renders requests with tools or tool turns (the family's shipped
    tool-aware template where the model's own has no tools, e.g. Gemma 3); ``family``
    parses tool calls and reasoning (None: an architecture without tool support);
    ``embedder`` serves ``/v1/embeddings`` when the entry asks for it.
    """

    entry: ModelEntry
    base_dir: Path
    created: int = field(default_factory=lambda: int(time.time()))
    state: ModelState = ModelState.LOADING
    engine: LlamaEngine | None = None
    template: ChatTemplate | None = None
    tool_template: ChatTemplate | None = None
    family: Family | None = None
    embedder: EmbeddingEngine | None = None

    @property
    def id(self) -> str:
        return self.entry.id


class ModelRegistry:
    """Loads and holds the served models.

    Args:
        entries: The entries to serve, the first being the default.
        base_dir: Folder of ``models.yaml`` (relative paths resolve against it).
        settings: Server settings (queue size, template bounds).
    """

    def __init__(self, entries: list[ModelEntry], base_dir: Path, settings: ServerSettings):
        self._models = {e.id: ServedModel(e, base_dir) for e in entries}
        self._default_id = entries[0].id
        self._settings = settings
        self._loader: threading.Thread | None = None

    def start_loading(self) -> None:
        """Load every model on a background thread, one after another."""
        self._loader = threading.Thread(target=self._load_all, name="model-loader", daemon=True)
        self._loader.start()

    def wait_loaded(self, timeout_s: float | None = None) -> None:
        """Block until the loader thread is done (for tests and benchmarks)."""
        if self._loader is not None:
            self._loader.join(timeout_s)

    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    def get(self, model_id: str) -> ServedModel:
        """The ready model with this id (``default`` names the default model).

        Raises:
            ModelNotFoundError: no such id is served.
            ModelUnavailableError: the model is loading or failed to load.
        """
        key = self._default_id if model_id == DEFAULT_ALIAS else model_id
        served = self._models.get(key)
        if served is None:
            raise ModelNotFoundError(model_id)
        if served.state is ModelState.LOADING:
            raise ModelUnavailableError(
                f"The model '{model_id}' is still loading; retry shortly.", code="model_loading"
            )
        if served.state is ModelState.FAILED:
            raise ModelUnavailableError(
                f"The model '{model_id}' failed to load; see the server log.",
                code="model_load_failed",
                retry_after_s=60,
            )
        return served

    def close(self) -> None:
        for served in self._models.values():
            if served.embedder is not None:
                served.embedder.close()
                served.embedder = None
            if served.engine is not None:
                served.engine.close()
                served.engine = None

    def _load_all(self) -> None:
        for served in self._models.values():
            started = time.monotonic()
            try:
                self._load(served)
            except (ModelsFileError, ModelLoadError, ChatTemplateError) as exc:
                served.state = ModelState.FAILED
                log.error("model '%s' failed to load: %s", served.id, exc)
            except Exception:
                served.state = ModelState.FAILED
                log.exception("model '%s' failed to load", served.id)
            else:
                served.state = ModelState.READY
                log.info("model '%s' ready in %.1f s", served.id, time.monotonic() - started)

    def _load(self, served: ServedModel) -> None:
        entry = served.entry
        path = resolve(entry.gguf, served.base_dir)
        mmproj = resolve(entry.mmproj, served.base_dir) if entry.mmproj else None
        engine = LlamaEngine(
            path,
            n_ctx=entry.n_ctx,
            n_parallel=entry.n_parallel,
            swa_full=entry.swa_full,
            n_gpu_layers=entry.n_gpu_layers,
            n_threads=entry.n_threads,
            n_batch=entry.n_batch,
            max_queued=self._settings.max_queued_requests,
            mmproj_path=mmproj,
            image_cache_bytes=self._settings.image_cache_bytes,
        )
        try:
            served.template = self._template(served, engine)
            served.family = family_for(engine.info.architecture)
            tool_source = served.family.tool_template if served.family else None
            served.tool_template = (
                self._compile(shipped_template(tool_source), engine)
                if tool_source
                else served.template
            )
            if entry.embeddings:
                served.embedder = EmbeddingEngine(
                    engine.model,
                    n_ctx=entry.n_ctx,
                    n_threads=entry.n_threads,
                    n_batch=min(entry.n_batch, entry.n_ctx),
                )
        except (ModelsFileError, ChatTemplateError, ModelLoadError):
            engine.close()
            raise
        served.engine = engine

    def _template(self, served: ServedModel, engine: LlamaEngine) -> ChatTemplate:
        """Template precedence: models.yaml override, then the GGUF's, then the fallback."""
        entry, info = served.entry, engine.info
        source = entry.chat_template
        if entry.chat_template_file is not None:
            path = Path(entry.chat_template_file).expanduser()
            path = path if path.is_absolute() else served.base_dir / path
            try:
                source = path.read_text(encoding="utf-8")
            except OSError:
                raise ModelsFileError(f"chat_template_file not readable: {path}") from None
        source = source or info.chat_template or fallback_template(info.architecture)
        if source is None:
            raise ChatTemplateError(
                f"no chat template in the GGUF and none built in for '{info.architecture}'; "
                "set chat_template in models.yaml"
            )
        return self._compile(source, engine)

    def _compile(self, source: str, engine: LlamaEngine) -> ChatTemplate:
        info = engine.info
        return ChatTemplate(
            source,
            bos_token=info.bos_token,
            eos_token=info.eos_token,
            timeout_s=self._settings.template_timeout_s,
            max_output_chars=self._settings.max_prompt_chars,
        )
