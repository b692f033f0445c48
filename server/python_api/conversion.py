"""``ggufserve.convert`` and ``ggufserve.quantize``: the converter's entry points (what
``python -m ggufserve.converters convert / quantize`` run), in-process."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the converter (gguf-py, numpy) loads only when called
    from ggufserve.converters.convert import ConversionResult
    from ggufserve.converters.quality import QualityReport


def convert(
    source: str | Path,
    out: str | Path,
    *,
    quant: str | None = None,
    name: str | None = None,
    outtype: str = "auto",
    mmproj_type: str = "f16",
    force: bool = False,
    report: bool = True,
) -> ConversionResult:
    """Convert a Gemma 3 / Qwen3-VL checkpoint (folder or Hugging Face repo id) into GGUF
    files in the folder ``out``: the text model as ``outtype`` (``auto``: the checkpoint's
    float type), its vision projector (``mmproj-*.gguf``) if any, and with ``quant`` (e.g.
    ``Q4_K_M``) a quantization of the text model, measured when ``report``.

    Returns:
        The paths written (``text``, ``mmproj``, ``quantized[quant]``), timings in seconds,
        and ``quality[quant]`` (a :class:`QualityReport`).

    Raises:
        ConversionError (any subclass, from ``ggufserve.converters.errors``): unreadable
            checkpoint, unsupported architecture, an output that exists without ``force``,
            a quantization or measurement failure.
    """
    from ggufserve.converters.convert import convert as run

    quants = [quant.upper()] if quant else []
    return run(
        str(source),
        out_dir=Path(out),
        name=name,
        outtype=outtype,
        quants=quants,
        mmproj_type=mmproj_type,
        force=force,
        report=report,
    )


def quantize(
    gguf: str | Path,
    quant: str = "Q4_K_M",
    out: str | Path | None = None,
    *,
    force: bool = False,
    report: bool = True,
) -> QualityReport | None:
    """Quantize an F32/F16/BF16 GGUF to ``quant``, into ``out`` (default: beside it,
    ``<stem>-<QUANT>.gguf`` as the converter's CLI names it).

    Returns:
        The quality report (KL divergence, top-1 agreement, perplexity ratio against the
        source on the calibration text; also written into the file and
        ``<out>.quality.json``), or None with ``report=False``.

    Raises:
        ConversionError: no such file. QuantizationError: unknown type or llama.cpp failed.
        OutputExistsError: ``out`` exists and not ``force``. QualityError: the
        measurement failed.
    """
    from ggufserve.converters.errors import ConversionError
    from ggufserve.converters.quality import quantize_and_report

    source = Path(gguf)
    if not source.is_file():
        raise ConversionError(f"no such file: {source}")
    stem = source.stem.rsplit("-", 1)[0] if "-" in source.stem else source.stem
    target = Path(out) if out is not None else source.with_name(f"{stem}-{quant.upper()}.gguf")
    reports = quantize_and_report(source, {quant.upper(): target}, force=force, report=report)
    return reports[quant.upper()]
