"""``ggufserve convert`` / ``ggufserve quantize`` (also ``python -m ggufserve.converters ...``).

Exit codes: 0 on success, 2 for a named conversion error, 1 when the output cannot be
written (disk full, permissions), 130 when interrupted (Ctrl-C); one line on stderr, no
traceback, nothing partial left.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ggufserve.converters.errors import ConversionError
from ggufserve.converters.quantize import QUANT_TYPES

if TYPE_CHECKING:
    from ggufserve.converters.quality import QualityReport

EXIT_ERROR = 2
EXIT_IO = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
NO_REPORT_HELP = "skip the quality report (KL divergence, top-1, PPL vs the source)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ggufserve", description="convert and quantize models")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="HF safetensors checkpoint → GGUF (+ mmproj)")
    convert.add_argument("source", help="checkpoint folder or Hugging Face repo id")
    convert.add_argument(
        "--outtype",
        choices=["auto", "f32", "f16", "bf16", "q8_0"],
        default="auto",
        help="type of the converted GGUF (auto: the checkpoint's own float type)",
    )
    convert.add_argument(
        "--quant",
        action="append",
        default=[],
        type=str.upper,
        choices=list(QUANT_TYPES),
        metavar="TYPE",
        help=f"also quantize with llama.cpp (repeatable): {', '.join(QUANT_TYPES)}",
    )
    convert.add_argument("--mmproj-type", choices=["f32", "f16", "q8_0"], default="f16")
    convert.add_argument("--out", type=Path, default=Path("models"), help="output folder")
    convert.add_argument("--name", help="output base name (default: the source's name)")
    convert.add_argument("--force", action="store_true", help="replace existing outputs")
    convert.add_argument(
        "--register", action="store_true", help="add/update an entry NAME in the models file"
    )
    convert.add_argument("--models", type=Path, default=Path("models.yaml"))
    convert.add_argument("--no-report", dest="report", action="store_false", help=NO_REPORT_HELP)
    quant = commands.add_parser("quantize", help="quantize a GGUF with llama.cpp")
    quant.add_argument("gguf", type=Path)
    quant.add_argument(
        "types", nargs="+", type=str.upper, choices=list(QUANT_TYPES), metavar="TYPE",
        help=f"one or more of: {', '.join(QUANT_TYPES)} (one reference pass for all)",
    )  # fmt: skip
    quant.add_argument("--out", type=Path, help="output file, with one TYPE (default: beside)")
    quant.add_argument("--force", action="store_true")
    quant.add_argument("--no-report", dest="report", action="store_false", help=NO_REPORT_HELP)
    return parser


def _run_convert(args: argparse.Namespace) -> None:
    from ggufserve.converters.convert import convert
    from ggufserve.converters.register import register

    result = convert(
        args.source,
        out_dir=args.out,
        name=args.name,
        outtype=args.outtype,
        quants=args.quant,
        mmproj_type=args.mmproj_type,
        force=args.force,
        report=args.report,
    )
    for path in [result.text, result.mmproj, *result.quantized.values()]:
        if path is not None:
            print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    _print_quality(result.quality.values())
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()))
    if args.register:
        served = next(iter(result.quantized.values()), result.text)
        register(args.models, result.name, served, result.mmproj)
        print(f"registered '{result.name}' in {args.models}")


def _run_quantize(args: argparse.Namespace) -> None:
    from ggufserve.converters.quality import quantize_and_report

    source: Path = args.gguf
    if not source.is_file():
        raise ConversionError(f"no such file: {source}")
    types = list(dict.fromkeys(args.types))
    if args.out is not None and len(types) > 1:
        raise ConversionError("--out names one file: give one TYPE with it")
    stem = source.stem.rsplit("-", 1)[0] if "-" in source.stem else source.stem
    targets = {t: args.out or source.with_name(f"{stem}-{t}.gguf") for t in types}
    reports = quantize_and_report(source, targets, force=args.force, report=args.report)
    for target in targets.values():
        print(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB)")
    _print_quality(r for r in reports.values() if r is not None)


def _print_quality(reports: Iterable[QualityReport]) -> None:
    from ggufserve.converters.quality import format_table

    table = format_table(reports)
    if table:
        print(table)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "convert":
            _run_convert(args)
        else:
            _run_quantize(args)
    except ConversionError as exc:
        print(f"ggufserve {args.command}: error: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # disk full, permissions: the partial output is already removed
        reason = exc.strerror or exc.__class__.__name__
        print(f"ggufserve {args.command}: error: cannot write output: {reason}", file=sys.stderr)
        return EXIT_IO
    except KeyboardInterrupt:  # the partial output is already removed
        print(f"\nggufserve {args.command}: interrupted; no partial file left", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
