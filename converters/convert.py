"""The conversion pipeline: checkpoint → text GGUF (+ mmproj) → quantized GGUFs.

Everything is validated (checkpoint, config, vocabulary, every tensor's name and shape,
and that no output would be overwritten) before the first byte is written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from ggufserve.converters.arch import ARCHITECTURES
from ggufserve.converters.arch.base import Converter
from ggufserve.converters.checkpoint import Checkpoint
from ggufserve.converters.errors import TensorMappingError, UnsupportedArchitectureError
from ggufserve.converters.metadata import general_metadata
from ggufserve.converters.quality import QualityReport, quantize_and_report
from ggufserve.converters.writer import PlannedTensor, check_output, write_gguf

log = logging.getLogger(__name__)

# Files fetched from the Hub for a repo id (weights in safetensors only: never pickles).
HUB_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "README.md",
]


@dataclass
class ConversionResult:
    """The output base name, paths written, timings (seconds) and each quantized file's
    quality report (absent with ``report=False``)."""

    name: str
    text: Path
    mmproj: Path | None
    quantized: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    quality: dict[str, QualityReport] = field(default_factory=dict)


def resolve_source(source: str) -> Path:
    """A local folder, or a Hugging Face repo id fetched with ``snapshot_download``
    (its cache and ``HF_HUB_OFFLINE`` honoured).

    Raises:
        CheckpointError: the repo is not cached while offline, or cannot be fetched.
    """
    path = Path(source).expanduser()
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    from ggufserve.converters.errors import CheckpointError

    try:
        return Path(snapshot_download(repo_id=source, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"'{source}' is not in the Hugging Face cache and cannot be downloaded "
            "(offline, or HF_HUB_OFFLINE=1)"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot fetch '{source}': {exc.__class__.__name__}") from None


def converters_for(ckpt: Checkpoint) -> tuple[Converter, Converter | None]:
    """Instantiate the converters named by ``config.json``'s ``architectures``.

    Raises:
        UnsupportedArchitectureError: no registered architecture is named.
    """
    names = ckpt.config.get("architectures")
    if not isinstance(names, list) or not names:
        raise UnsupportedArchitectureError("config.json has no 'architectures' list")
    for name in names:
        if name in ARCHITECTURES:
            text_cls, vision_cls = ARCHITECTURES[name]
            return text_cls(ckpt), vision_cls(ckpt) if vision_cls else None
    known = ", ".join(ARCHITECTURES)
    raise UnsupportedArchitectureError(f"architecture {names} is not supported (known: {known})")


def metadata_writer(
    converter: Converter, ckpt: Checkpoint, name: str, source: str, gguf_type: str
) -> Callable[[gguf.GGUFWriter], None]:
    """general.type (``gguf.GGUFType.MODEL`` or ``MMPROJ``) and general.* (name, basename,
    size label, license, sampling defaults, ...) as llama.cpp's convert_hf_to_gguf.py
    writes them (:func:`ggufserve.converters.metadata.general_metadata`), then the converter's
    hparams. ``name`` becomes general.name only when it is not the default (the source's
    folder or repo name): a given --name, like llama.cpp's --model-name."""
    is_repo = source.count("/") == 1 and not Path(source).exists()
    given = name if name != Path(source.rstrip("/")).name else None

    def write(writer: gguf.GGUFWriter) -> None:
        counts = writer.get_total_parameter_count()
        meta = general_metadata(ckpt, counts, name=given, repo_id=source if is_repo else None)
        writer.add_type(gguf_type)
        meta.set_gguf_meta_model(writer)
        converter.set_gguf_parameters(writer)

    return write


def plan_all(
    ckpt: Checkpoint, text: Converter, vision: Converter | None
) -> tuple[list[PlannedTensor], list[PlannedTensor]]:
    """Plan both outputs and prove every stored tensor is used.

    Raises:
        TensorMappingError: a tensor no converter claims, or one without a GGUF name.
    """
    text_plan = text.plan_tensors()
    vision_plan = vision.plan_tensors() if vision else []
    claimed = {n for n in ckpt.tensors if text.claims(n) or (vision and vision.claims(n))}
    orphans = sorted(set(ckpt.tensors) - claimed)
    if orphans:
        raise TensorMappingError(
            f"{len(orphans)} tensor(s) belong to no converter (first: {', '.join(orphans[:3])}); "
            "refusing to drop weights"
        )
    return text_plan, vision_plan


def convert(
    source: str,
    *,
    out_dir: Path,
    name: str | None = None,
    outtype: str = "auto",
    quants: list[str] | None = None,
    mmproj_type: str = "f16",
    force: bool = False,
    report: bool = True,
) -> ConversionResult:
    """Convert a checkpoint; see the module docstring for the order of checks.

    Args:
        source: Checkpoint folder or Hugging Face repo id.
        out_dir: Folder for the outputs (created if needed).
        name: Output base name (default: the folder / repo name).
        outtype: f32 | f16 | bf16 | q8_0 | auto (the checkpoint's own float type).
        quants: llama.cpp quantization types made from the text GGUF (one intermediate).
        mmproj_type: f32 | f16 | q8_0 for the vision projector.
        force: Replace existing outputs.
        report: Measure each quantization against the text GGUF (ggufserve.converters.quality).

    Raises:
        ConversionError (any subclass): nothing has been written in that case, except
            for quantization failures after the text GGUF was written.
    """
    started = time.monotonic()
    root = resolve_source(source)
    ckpt = Checkpoint.open(root)
    text, vision = converters_for(ckpt)
    text_plan, vision_plan = plan_all(ckpt, text, vision)
    # A repo id's snapshot folder is a commit hash: name outputs after the repo instead.
    name = name or Path(source.rstrip("/")).name or root.resolve().name
    outtype = _auto_outtype(ckpt) if outtype == "auto" else outtype
    text_path = out_dir / f"{name}-{outtype.upper()}.gguf"
    mmproj_path = out_dir / f"mmproj-{name}-{mmproj_type.upper()}.gguf" if vision else None
    quant_paths = {q.upper(): out_dir / f"{name}-{q.upper()}.gguf" for q in quants or []}
    for path in [text_path, mmproj_path, *quant_paths.values()]:
        if path is not None:
            check_output(path, force)
    result = ConversionResult(name=name, text=text_path, mmproj=mmproj_path)
    outputs = [("text", text_path, text, text_plan, outtype, gguf.GGUFType.MODEL)]
    if vision is not None and mmproj_path is not None:
        outputs.append(
            ("mmproj", mmproj_path, vision, vision_plan, mmproj_type, gguf.GGUFType.MMPROJ)
        )
    for label, path, converter, plan, otype, gguf_type in outputs:
        mark = time.monotonic()
        write_gguf(
            path,
            converter.gguf_arch,
            metadata_writer(converter, ckpt, name, source, gguf_type),
            plan,
            otype,
            force=force,
            progress_label=label,
        )
        result.seconds[label] = time.monotonic() - mark
    mark = time.monotonic()
    reports = quantize_and_report(text_path, quant_paths, force=force, report=report)
    result.quantized = dict(quant_paths)
    result.quality = {quant: r for quant, r in reports.items() if r is not None}
    if quant_paths:
        result.seconds["quantize"] = time.monotonic() - mark  # every type, with its report
    result.seconds["total"] = time.monotonic() - started
    return result


def _auto_outtype(ckpt: Checkpoint) -> str:
    """The checkpoint's float type, so the intermediate loses nothing (F32 if mixed)."""
    dtypes = {ref.dtype for ref in ckpt.tensors.values()}
    return {frozenset({"BF16"}): "bf16", frozenset({"F16"}): "f16"}.get(frozenset(dtypes), "f32")
