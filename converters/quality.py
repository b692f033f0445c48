"""The quality report at quantize time: how far a quantized GGUF is from its source.

On a fixed bundled calibration text (``converters/calibration/``, several hundred tokens:
UDHR articles in six languages and scripts, plus code) the source ("reference") model is
run once; then each quantized model is run over the same tokens and compared with it
batch by batch (``converters/quality_measure.py``), so memory holds one model and one
batch of logits:

- KL divergence per position, KL(reference ‖ quantized) in nats: mean and 99th percentile;
- top-1 agreement: the fraction of positions whose argmax is the same;
- PPL ratio: perplexity of the text's own next tokens, quantized / reference.

The figures go into the quantized GGUF (``ggufserve.quality.*``) and a JSON beside it
(``<file>.quality.json``); ``read_quality`` reads them back. Nothing partial is left when
interrupted: quantize into a scratch file, measure it, then write the final file under a
temporary name with the figures added, and rename it into place.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ggufserve.converters.gguf_meta import read_metadata
from ggufserve.converters.llama_eval import QualityError
from ggufserve.converters.quality_measure import Reference, calibration, reference_pass
from ggufserve.converters.quantize import MetadataValue, copy_with_metadata, ftype_of, quantize
from ggufserve.converters.writer import atomic_path, check_output

__all__ = [
    "QualityError",
    "QualityReport",
    "calibration",
    "format_table",
    "quantize_and_report",
    "read_quality",
    "report_path",
]

PREFIX = "ggufserve.quality."
FIGURES = ("kl_mean", "kl_p99", "top1_agreement", "ppl_ratio", "n_tokens", "reference")


@dataclass
class QualityReport:
    """One quantized file against its reference, on the calibration text."""

    quant: str
    kl_mean: float  # nats per position
    kl_p99: float
    top1_agreement: float  # fraction of positions
    ppl_ratio: float  # PPL(quantized) / PPL(reference)
    n_tokens: int  # positions scored (each predicts the next token of the text)
    reference: str  # the source's file type, e.g. "F32", "BF16"
    calibration: str  # Calibration.label
    size_bytes: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def metadata(self) -> dict[str, MetadataValue]:
        """The ``ggufserve.quality.*`` keys written into the GGUF."""
        return {PREFIX + key: getattr(self, key) for key in (*FIGURES, "calibration")}


def report_path(gguf_path: Path) -> Path:
    """``<file>.quality.json`` beside the GGUF."""
    return gguf_path.with_name(gguf_path.name + ".quality.json")


def read_quality(path: Path) -> dict[str, Any] | None:
    """The quality figures of a quantized GGUF (keys ``kl_mean``, ``kl_p99``,
    ``top1_agreement``, ``ppl_ratio``, ``n_tokens``, ``reference``, ``calibration``):
    from its ``ggufserve.quality.*`` metadata, else from ``<file>.quality.json`` when that
    describes a file of this size; None when neither has them. Fast (~0.1 s): ggml's own
    GGUF parser reads the metadata without the tensors."""
    values = read_metadata(path, PREFIX) if path.is_file() else None
    if values and all(PREFIX + key in values for key in FIGURES):
        return {key[len(PREFIX) :]: value for key, value in values.items()}
    try:
        data = json.loads(report_path(path).read_text(encoding="utf-8"))
        size = path.stat().st_size
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("size_bytes") != size:
        return None  # stale: written for another file under this name
    return data if all(key in data for key in FIGURES) else None


def quantize_and_report(
    source: Path,
    targets: Mapping[str, Path],
    *,
    force: bool,
    report: bool = True,
    n_threads: int | None = None,
) -> dict[str, QualityReport | None]:
    """Quantize ``source`` to each ``{type: target}``; with ``report``, measure each
    against ``source`` (whose reference pass runs once) and store the figures in the file
    and ``<target>.quality.json``.

    Raises:
        QuantizationError: unknown type (before anything is written) or llama.cpp failed.
        OutputExistsError: a target exists and not ``force``.
        QualityError: the measurement failed (that target is not written).
    """
    for quant, target in targets.items():
        ftype_of(quant)
        check_output(target, force)
    results: dict[str, QualityReport | None] = {}
    if not report:
        for quant, target in targets.items():
            quantize(source, target, quant, force=True, n_threads=n_threads)
            report_path(target).unlink(missing_ok=True)  # it described the replaced file
            results[quant] = None
        return results
    if not targets:
        return results
    folder = next(iter(targets.values())).parent
    with contextlib.ExitStack() as stack:
        made: list[Reference] = []

        def reference() -> Reference:
            """The reference pass, run once, after a first quantization has worked."""
            if not made:
                made.append(stack.enter_context(reference_pass(source, folder, n_threads)))
            return made[0]

        for quant, target in targets.items():
            results[quant] = _quantize_measured(source, target, quant, reference, n_threads)
    return results


def _quantize_measured(
    source: Path,
    target: Path,
    quant: str,
    get_reference: Callable[[], Reference],
    n_threads: int | None,
) -> QualityReport:
    """Quantize into a scratch file, measure it, write ``target`` with the figures."""
    mark = time.monotonic()
    seconds: dict[str, float] = {}
    with atomic_path(target) as final, scratch_path(target) as raw:
        quantize(source, raw, quant, force=True, n_threads=n_threads)
        seconds["quantize"] = time.monotonic() - mark
        reference = get_reference()
        seconds["reference"], mark = reference.seconds, time.monotonic()
        kl, top1, nll = reference.compare(raw, quant)
        seconds["measure"], mark = time.monotonic() - mark, time.monotonic()
        result = QualityReport(
            quant=quant,
            kl_mean=float(kl.mean()),
            kl_p99=float(np.percentile(kl, 99)),
            top1_agreement=float(top1.mean()),
            ppl_ratio=math.exp(float(nll.mean()) - reference.mean_nll),
            n_tokens=len(kl),
            reference=reference.file_type,
            calibration=reference.calibration.label,
            seconds=seconds,
        )
        # A byte-for-byte tensor copy with the keys added, by llama.cpp (only_copy +
        # kv_overrides): ~1 s, where gguf-py's reader parses Gemma's vocabulary for ~20 s.
        copy_with_metadata(raw, final, result.metadata())
        seconds["write"] = time.monotonic() - mark
    result.size_bytes = target.stat().st_size
    _write_json(target, source, result, reference)
    return result


def _write_json(target: Path, source: Path, result: QualityReport, reference: Reference) -> None:
    data = {
        "file": target.name,
        "type": result.quant,
        **{key: value for key, value in asdict(result).items() if key not in ("quant",)},
        "reference_file": source.name,
        "ppl_reference": math.exp(reference.mean_nll),
        "versions": versions(),
    }
    with atomic_path(report_path(target)) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def versions() -> dict[str, str]:
    """ggufserve, llama-cpp-python and llama.cpp (ggml commit) versions."""
    import ctypes

    from llama_cpp import llama_cpp as bindings

    def package(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    commit = "unknown"
    with contextlib.suppress(AttributeError):
        function = ctypes.CFUNCTYPE(ctypes.c_char_p)(("ggml_commit", bindings._lib))
        commit = (function() or b"unknown").decode()
    return {
        "ggufserve": package("ggufserve"),
        "llama_cpp_python": package("llama_cpp_python"),
        "llama.cpp": commit,
    }


@contextlib.contextmanager
def scratch_path(beside: Path) -> Iterator[Path]:
    """A hidden file name beside ``beside``, removed when the block ends, however it ends."""
    path = beside.with_name(f".{beside.name}.{uuid.uuid4().hex[:8]}.scratch")
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def format_table(reports: Iterable[QualityReport]) -> str:
    """The report as a text table, one row per quantized file."""
    rows = list(reports)
    if not rows:
        return ""
    first = rows[0]
    lines = [
        f"quality vs {first.reference} on {first.calibration} ({first.n_tokens} tokens):",
        f"{'type':<8} {'size MB':>9} {'KL mean':>9} {'KL p99':>9} {'top-1':>7} {'PPL ratio':>9}",
    ]
    for r in rows:
        lines.append(
            f"{r.quant:<8} {r.size_bytes / 1e6:>9.1f} {r.kl_mean:>9.5f} {r.kl_p99:>9.4f} "
            f"{100 * r.top1_agreement:>6.1f}% {r.ppl_ratio:>9.4f}"
        )
    return "\n".join(lines)
