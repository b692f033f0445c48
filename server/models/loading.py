"""Build and free one model's runtime parts: its llama.cpp engine, chat templates, tool
family and embedding context (blocking work: the registry runs it on its loader thread)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ggufserve.engine.base import ModelLoadError
from ggufserve.engine.embedding import EmbeddingEngine
from ggufserve.engine.llama import LlamaEngine
from ggufserve.engine.speculative import SpecConfig
from ggufserve.families import family_for
from ggufserve.families.base import Family
from ggufserve.generation.templates import (
    ChatTemplate,
    ChatTemplateError,
    fallback_template,
    shipped_template,
)
from ggufserve.models.fingerprint import system_fingerprint
from ggufserve.models.model_files import resolve, resolve_draft
from ggufserve.settings import ModelEntry, ModelsFileError, ServerSettings


@dataclass
class LoadedParts:
    """What a loaded model holds. ``tool_template`` renders requests with tools or tool
    turns (the family's shipped tool-aware template where the model's own has no tools,
    e.g. Gemma 3); ``family`` (bound to this model's vocabulary) writes and parses tool
    calls and reasoning (None: an architecture no family serves, without tool support);
    ``embedder`` serves ``/v1/embeddings`` when the entry asks."""

    engine: LlamaEngine
    template: ChatTemplate
    tool_template: ChatTemplate
    family: Family | None
    embedder: EmbeddingEngine | None
    system_fingerprint: str  # see ggufserve.models.fingerprint

    def close(self) -> None:
        """Free the embedding context, then the engine (which drains its requests)."""
        if self.embedder is not None:
            self.embedder.close()
        self.engine.close()


def model_paths(entry: ModelEntry, base_dir: Path) -> tuple[Path, Path | None]:
    """The local GGUF and mmproj paths (downloading or assembling them if needed).

    Raises:
        ModelsFileError: see :func:`ggufserve.models.model_files.resolve`.
    """
    gguf = resolve(entry.gguf, base_dir)
    mmproj = resolve(entry.mmproj, base_dir) if entry.mmproj else None
    return gguf, mmproj


def draft_path(entry: ModelEntry, base_dir: Path) -> Path | None:
    """The local draft model GGUF of ``speculative: {type: draft}``, else None.

    Raises:
        ModelsFileError: see :func:`ggufserve.models.model_files.resolve_draft`.
    """
    spec = entry.speculative
    return resolve_draft(spec.draft, base_dir) if spec.type == "draft" and spec.draft else None


def load_parts(
    entry: ModelEntry,
    base_dir: Path,
    paths: tuple[Path, Path | None],
    settings: ServerSettings,
    load_progress: Callable[[float], None] | None = None,
    draft: Path | None = None,
) -> LoadedParts:
    """Load the model and compile its templates (blocking; seconds to minutes);
    ``load_progress`` gets llama.cpp's loaded fraction (0..1) of the weights; ``draft``
    is the draft model of ``speculative: {type: draft}`` (:func:`draft_path`).

    Raises:
        ModelLoadError: llama.cpp could not load the file or create a context, or the
            draft model's vocabulary differs from the model's.
        ModelsFileError: ``chat_template_file`` is unreadable.
        ChatTemplateError: no usable chat template, or one that does not compile.
    """
    path, mmproj = paths
    fingerprint = system_fingerprint(paths)  # before the engine: nothing to free if stat fails
    engine = LlamaEngine(
        path,
        n_ctx=entry.n_ctx,
        n_parallel=entry.n_parallel,
        swa_full=entry.swa_full,
        cache_type_k=entry.cache_type_k,
        cache_type_v=entry.cache_type_v,
        flash_attn=entry.flash_attn,
        n_gpu_layers=entry.n_gpu_layers,
        n_threads=entry.n_threads,
        n_batch=entry.n_batch,
        max_queued=settings.max_queued_requests,
        mmproj_path=mmproj,
        image_cache_bytes=settings.image_cache_bytes,
        image_min_tokens=entry.image_min_tokens,
        image_max_tokens=entry.image_max_tokens,
        load_progress=load_progress,
        speculation=_speculation(entry, draft),
    )
    try:
        template = _template(entry, base_dir, engine, settings)
        # The family's trigger token is looked up here, once per load.
        family = family_for(engine.info.architecture, engine.tokenize)
        tool_source = family.tool_template if family else None
        tool_template = (
            _compile(shipped_template(tool_source), engine, settings) if tool_source else template
        )
        embedder = None
        if entry.embeddings:
            embedder = EmbeddingEngine(
                engine.model,
                n_ctx=entry.n_ctx,
                n_threads=entry.n_threads,
                n_batch=min(entry.n_batch, entry.n_ctx),
            )
    except (ModelsFileError, ChatTemplateError, ModelLoadError):
        engine.close()
        raise
    return LoadedParts(engine, template, tool_template, family, embedder, fingerprint)


def _speculation(entry: ModelEntry, draft: Path | None) -> SpecConfig | None:
    spec = entry.speculative
    if spec.type == "none":
        return None
    if spec.type == "draft":
        if draft is None:
            raise ModelsFileError(f"model '{entry.id}': speculative type 'draft' without a file")
        return SpecConfig(n_max=spec.n_max, draft=draft)
    return SpecConfig(n_max=spec.n_max)


def _template(
    entry: ModelEntry, base_dir: Path, engine: LlamaEngine, settings: ServerSettings
) -> ChatTemplate:
    """Template precedence: models.yaml override, then the GGUF's, then the fallback."""
    info = engine.info
    source = entry.chat_template
    if entry.chat_template_file is not None:
        path = Path(entry.chat_template_file).expanduser()
        path = path if path.is_absolute() else base_dir / path
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
    return _compile(source, engine, settings)


def _compile(source: str, engine: LlamaEngine, settings: ServerSettings) -> ChatTemplate:
    info = engine.info
    return ChatTemplate(
        source,
        bos_token=info.bos_token,
        eos_token=info.eos_token,
        timeout_s=settings.template_timeout_s,
        max_output_chars=settings.max_prompt_chars,
    )
