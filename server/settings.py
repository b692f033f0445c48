"""Server settings (environment + CLI flags) and the ``models.yaml`` registry schema.

``ServerSettings`` reads ``GGUFSERVE_*`` environment variables; CLI flags override them.
``load_models_file`` validates ``models.yaml`` and raises :class:`ModelsFileError` naming
the entry and the key at fault, so a bad file stops start-up with one clear line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, SettingsConfigDict

from ggufserve.api.wire import KeepAlive, keep_alive_seconds
from ggufserve.engine.kv_cache import FlashAttn, KvCacheType, is_quantized
from ggufserve.models.memory import parse_budget

MiB = 1024 * 1024


class ModelsFileError(Exception):
    """``models.yaml`` is missing, unreadable, malformed, or names a file that does not exist."""


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class FileSource(_Entry):
    """Where a GGUF file comes from: exactly one of a local path, a Hugging Face repo
    file (resolved through huggingface_hub, honouring its cache and ``HF_HUB_OFFLINE``),
    or an installed Python package whose ``assemble()`` returns the file's path."""

    path: str | None = None
    hf_repo: str | None = None
    hf_file: str | None = None
    revision: str | None = None
    package: str | None = None

    @model_validator(mode="after")
    def _exactly_one_form(self) -> FileSource:
        forms = [self.path is not None, self.hf_repo is not None, self.package is not None]
        if sum(forms) != 1:
            raise ValueError("give exactly one of 'path', 'hf_repo' (+ 'hf_file') or 'package'")
        if (self.hf_repo is None) != (self.hf_file is None):
            raise ValueError("'hf_repo' and 'hf_file' go together")
        if self.revision is not None and self.hf_repo is None:
            raise ValueError("'revision' applies to 'hf_repo' sources only")
        return self


class SamplingDefaults(_Entry):
    """Per-model sampling defaults, used where a request leaves a field unset.

    The defaults are llama.cpp's; Gemma 3's card recommends temperature 1.0, top_k 64,
    top_p 0.95 (set in ``models.yaml``)."""

    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.8
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.95
    top_k: Annotated[int, Field(ge=0)] = 40
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.05
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    repeat_penalty: Annotated[float, Field(gt=0.0, le=10.0)] = 1.0


class Speculative(_Entry):
    """Speculative decoding of a model: ``type`` ``ngram`` (prompt lookup: drafts copied
    from the prompt and output so far, no extra model; on by default), ``draft`` (drafts
    from the small model ``draft``: a GGUF path, relative to models.yaml, or a store id;
    same vocabulary as the served model) or ``none``; ``n_max`` draft tokens at most per
    sequence and step (the engine adapts below it)."""

    type: Literal["ngram", "draft", "none"] = "ngram"
    draft: Annotated[str, Field(min_length=1)] | None = None
    n_max: Annotated[int, Field(ge=1, le=64)] = 16

    @model_validator(mode="after")
    def _draft_iff_type_draft(self) -> Speculative:
        if self.type == "draft" and self.draft is None:
            raise ValueError("type 'draft' needs 'draft': the draft model's GGUF path or store id")
        if self.type != "draft" and self.draft is not None:
            raise ValueError(f"'draft' applies to type 'draft' only (type is '{self.type}')")
        return self


def _lower(value: Any) -> Any:
    """``Q8_0`` → ``q8_0``: llama.cpp's log and docs spell types both ways."""
    return value.lower() if isinstance(value, str) else value


def _on_off(value: Any) -> Any:
    """YAML 1.1 reads a bare ``on`` / ``off`` as true / false: take them as meant."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return _lower(value)


class ModelEntry(_Entry):
    """One served model.

    ``n_gpu_layers`` -1 offloads every layer on GPU builds (CUDA/Metal) and is ignored on
    CPU builds. ``n_threads`` None uses every core. ``n_parallel`` requests decode
    together in one context of ``n_ctx`` tokens shared by all of them.
    ``chat_template`` (inline Jinja) or ``chat_template_file`` override the template
    embedded in the GGUF. ``embeddings`` adds a pooled context for ``/v1/embeddings``
    (its own KV memory of ``n_ctx`` tokens, always f16).
    ``cache_type_k`` / ``cache_type_v`` store the generation context's keys / values
    as f16 (default) or a smaller type (``q8_0``, ``q4_0``, ...: ``engine/kv_cache.py``);
    a quantized V cache needs ``flash_attn`` ``auto`` or ``on``.
    """

    id: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:/-]+$")]
    gguf: FileSource
    mmproj: FileSource | None = None
    chat_template: str | None = None
    chat_template_file: str | None = None
    n_ctx: Annotated[int, Field(ge=128, le=1_048_576)] = 8192
    n_gpu_layers: Annotated[int, Field(ge=-1)] = -1
    n_threads: Annotated[int, Field(ge=1, le=1024)] | None = None
    n_batch: Annotated[int, Field(ge=32, le=65_536)] = 512
    # Sequences decoded together (continuous batching); they share n_ctx (unified KV).
    n_parallel: Annotated[int, Field(ge=1, le=256)] = 4
    # Keep the whole context in sliding-window layers so cached prefixes stay reusable.
    swa_full: bool = True
    # KV cache element types (docs/engine-and-performance.md#kv-cache-types).
    cache_type_k: Annotated[KvCacheType, BeforeValidator(_lower)] = "f16"
    cache_type_v: Annotated[KvCacheType, BeforeValidator(_lower)] = "f16"
    flash_attn: Annotated[FlashAttn, BeforeValidator(_on_off)] = "auto"
    # Also serve /v1/embeddings from a second, pooled context on the same weights.
    embeddings: bool = False
    # Tokens per image for Qwen-VL projectors (mtmd scales images into the range);
    # None: the projector's own (8..4096). docs/models-yaml.md explains the trade-off.
    image_min_tokens: Annotated[int, Field(ge=1, le=1_048_576)] | None = None
    image_max_tokens: Annotated[int, Field(ge=1, le=1_048_576)] | None = None
    sampling: SamplingDefaults = SamplingDefaults()
    speculative: Speculative = Speculative()
    # Idle time before unloading: seconds, "30s"/"5m"/"1h", -1 = never, 0 = right after
    # each request. None: forever for start-up (--model) models, else --keep-alive.
    keep_alive: KeepAlive = None

    @model_validator(mode="after")
    def _one_template_form(self) -> ModelEntry:
        if self.chat_template is not None and self.chat_template_file is not None:
            raise ValueError("give at most one of 'chat_template' and 'chat_template_file'")
        return self

    @model_validator(mode="after")
    def _quantized_v_needs_flash_attn(self) -> ModelEntry:
        if self.flash_attn == "off" and is_quantized(self.cache_type_v):
            raise ValueError(
                f"'cache_type_v' {self.cache_type_v} is quantized, which needs flash "
                "attention: set 'flash_attn' to auto or on, or 'cache_type_v' to f16"
            )
        return self

    @field_validator("image_min_tokens")
    @classmethod
    def _image_fits_context(cls, low: int | None, info: ValidationInfo) -> int | None:
        n_ctx = info.data.get("n_ctx")
        if low is not None and n_ctx is not None and low >= n_ctx:
            raise ValueError(f"image_min_tokens ({low}) leaves no room in n_ctx ({n_ctx})")
        return low

    @field_validator("image_max_tokens")
    @classmethod
    def _image_tokens_in_order(cls, high: int | None, info: ValidationInfo) -> int | None:
        low = info.data.get("image_min_tokens")
        if high is not None and low is not None and low > high:
            raise ValueError(f"image_max_tokens ({high}) is below image_min_tokens ({low})")
        return high


class ModelsFile(_Entry):
    """The whole ``models.yaml``: ``default`` (an id) and the list of ``models``."""

    default: str | None = None
    models: Annotated[list[ModelEntry], Field(min_length=1)]

    @model_validator(mode="after")
    def _ids_unique_and_default_known(self) -> ModelsFile:
        seen: set[str] = set()
        for entry in self.models:
            if entry.id in seen:
                raise ValueError(f"duplicate model id '{entry.id}'")
            seen.add(entry.id)
        if self.default is not None and self.default not in seen:
            raise ValueError(f"'default' names '{self.default}', which is not in 'models'")
        return self

    @property
    def default_id(self) -> str:
        """The id served when none is asked for: ``default``, else the first entry."""
        return self.default if self.default is not None else self.models[0].id

    def entry(self, model_id: str) -> ModelEntry:
        """The entry with this id. Raises: ModelsFileError if there is none."""
        for entry in self.models:
            if entry.id == model_id:
                return entry
        known = ", ".join(e.id for e in self.models)
        raise ModelsFileError(f"no model '{model_id}' in the models file (known: {known})")


def _describe(error: ErrorDetails, raw: Any) -> str:
    """One line for one pydantic error: which entry, which key, what is wrong."""
    loc = list(error["loc"])
    where = "models file"
    if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int):
        index = loc[1]
        entries = raw.get("models") if isinstance(raw, dict) else None
        entry_id = None
        if isinstance(entries, list) and index < len(entries) and isinstance(entries[index], dict):
            entry_id = entries[index].get("id")
        where = f"entry '{entry_id}'" if entry_id else f"entry #{index + 1}"
        loc = loc[2:]
    key = ".".join(str(part) for part in loc) or "(entry)"
    return f"{where}: key '{key}': {error['msg']}"


def parse_models_file(raw: Any, source: str) -> ModelsFile:
    """Validate an already-parsed YAML document.

    Raises:
        ModelsFileError: naming the entry and key of every problem found.
    """
    try:
        return ModelsFile.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(err, raw) for err in exc.errors(include_url=False)]
        raise ModelsFileError(f"{source}: " + "; ".join(lines)) from None


def load_models_file(path: Path) -> ModelsFile:
    """Read and validate ``models.yaml``.

    Raises:
        ModelsFileError: the file is missing or unreadable, is not valid YAML, or fails
            validation (unknown keys, wrong types, duplicate ids).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelsFileError(f"cannot read models file {path}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ModelsFileError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None
    return parse_models_file(raw, str(path))


class ServerSettings(BaseSettings):
    """Process-wide settings; each field can be set as ``GGUFSERVE_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="GGUFSERVE_", extra="ignore")

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    api_key: str | None = None
    models_file: Path = Path("models.yaml")
    # Ids to serve; empty serves the file's default entry.
    models: list[str] = []
    max_queued_requests: Annotated[int, Field(ge=0)] = 16
    max_request_bytes: Annotated[int, Field(ge=1024)] = 32 * MiB
    max_prompt_chars: Annotated[int, Field(ge=1)] = 1_000_000
    # Inputs in one /v1/embeddings request (OpenAI allows 2048).
    max_embedding_inputs: Annotated[int, Field(ge=1)] = 2048
    template_timeout_s: Annotated[float, Field(gt=0)] = 2.0
    cors_allow_origins: list[str] = []
    log_level: str = "info"
    # Generate a few tokens in a child process before serving (once per library build).
    startup_check: bool = True
    # Serve the browser chat page at / (server/api/web/); --no-webui turns it off.
    webui: bool = True
    # Images (vision models)
    max_images_per_request: Annotated[int, Field(ge=0)] = 8
    max_image_bytes: Annotated[int, Field(ge=1)] = 20_000_000
    max_image_pixels: Annotated[int, Field(ge=1)] = 50_000_000
    image_fetch_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    max_image_redirects: Annotated[int, Field(ge=0)] = 3
    local_media_root: Path | None = None
    # LRU of encoded images per model, bytes (0 disables it): 256 MiB.
    image_cache_bytes: Annotated[int, Field(ge=0)] = 256 * MiB
    # Test-only: non-public networks image URLs may point to (e.g. ["127.0.0.0/8"]).
    allowed_private_networks: list[str] = []
    # Loading on demand (docs/models-yaml.md).
    # Idle time before an on-demand model unloads (seconds; "5m"; -1 = never): 5 min.
    keep_alive: Annotated[float, BeforeValidator(keep_alive_seconds)] = 300.0
    # Budget of the loaded models' estimated memory (bytes or "8GiB"); None = unbounded.
    max_memory: Annotated[int | None, BeforeValidator(parse_budget)] = None
    # Longest a request waits for its model to load before 503 model_loading (0: never).
    load_timeout_s: Annotated[float, Field(ge=0)] = 120.0
    # Characters over all text inputs of one /v1/embeddings request (~250k tokens).
    max_embedding_chars: Annotated[int, Field(ge=1)] = 1_000_000
    # JSON values (counted as commas, '{' and '[') in a request body: parsing holds the
    # GIL for ~1 us per value, so 50k keeps the event loop free within ~50 ms.
    max_json_values: Annotated[int, Field(ge=1000)] = 50_000
    # HTTP (docs/security.md): request header block, in bytes, and header count.
    max_header_bytes: Annotated[int, Field(ge=1024)] = 32 * 1024  # 32 KiB
    max_header_count: Annotated[int, Field(ge=16)] = 100
    # A request's headers must arrive within this of its first byte (or of the connection).
    header_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    # Its body within this of its headers (32 MiB at >= 0.5 MiB/s).
    body_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    # An idle keep-alive connection is closed after this.
    http_keep_alive_s: Annotated[float, Field(gt=0)] = 5.0
    # Liveness: /health answers 503 "stalled" while a model's scheduler step has run longer.
    max_step_s: Annotated[float, Field(gt=0)] = 60.0
    # /v1/responses store ($GGUFSERVE_HOME/responses.sqlite3): most responses kept (the
    # oldest go first) and seconds each is kept (30 days, as OpenAI keeps them).
    max_stored_responses: Annotated[int, Field(ge=1)] = 1000
    stored_response_ttl_s: Annotated[float, Field(gt=0)] = 30 * 24 * 3600.0
