"""The measurement behind the quality report: the reference model's next-token
distributions on the bundled calibration text, and a quantized model's distance to them.

The reference runs once over the text; its softmax rows go to a scratch file (float32,
n_tokens - 1 rows of n_vocab) that each comparison reads back sequentially while the
quantized model produces the same positions' logits batch by batch, in the manner of
llama.cpp's ``perplexity --kl-divergence``. Memory: one model plus one batch of logits
(LogitsRunner) plus ROW_CHUNK rows of working arrays.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ggufserve.converters.gguf_meta import read_metadata
from ggufserve.converters.llama_eval import LogitsRunner, QualityError
from ggufserve.converters.progress import progress

CALIBRATION_FILE = "udhr6-code.md"
ROW_CHUNK = 16  # positions per working set: 16 × n_vocab × 8 B (32 MiB for Gemma 3)


@dataclass(frozen=True)
class Calibration:
    name: str
    text: str
    sha256: str

    @property
    def label(self) -> str:
        """``udhr6-code@<first 12 hex of sha256>``: names the exact text measured on."""
        return f"{self.name}@{self.sha256[:12]}"


def calibration() -> Calibration:
    """The bundled calibration text (package data; see calibration/SOURCE.md)."""
    data = importlib.resources.files("ggufserve.converters") / "calibration" / CALIBRATION_FILE
    raw = data.read_bytes()
    name = CALIBRATION_FILE.rsplit(".", 1)[0]
    return Calibration(name, raw.decode("utf-8"), hashlib.sha256(raw).hexdigest())


@contextlib.contextmanager
def reference_pass(source: Path, folder: Path, n_threads: int | None) -> Iterator[Reference]:
    """Run the reference model once; its softmax rows live in a scratch folder inside
    ``folder`` (the outputs' disk, not a possibly RAM-backed /tmp) until the block ends."""
    with tempfile.TemporaryDirectory(dir=folder, prefix=".ggufserve-reference-") as scratch:
        yield Reference.measure(source, Path(scratch) / "probs.f32", n_threads)


@dataclass
class Reference:
    """The reference model's output on the calibration text.

    ``probs`` holds float32 softmax rows (n_tokens - 1, n_vocab) in position order, read
    back sequentially by ``compare`` (plain file reads, not a memory map, so they never
    count towards this process's memory)."""

    source: Path
    probs: Path
    calibration: Calibration
    file_type: str
    tokens: list[int]
    n_vocab: int
    neg_entropy: np.ndarray  # (n,) float64: sum p log p per position
    argmax: np.ndarray  # (n,) int64: the reference's top-1 per position
    mean_nll: float  # mean -log p(next token)
    seconds: float
    n_threads: int | None

    @property
    def n_scored(self) -> int:
        return len(self.tokens) - 1

    @classmethod
    def measure(cls, source: Path, probs: Path, n_threads: int | None) -> Reference:
        """Raises: QualityError: llama.cpp failed, or the text is under two tokens."""
        started = time.monotonic()
        text = calibration()
        file_type = source_file_type(source)
        with LogitsRunner(source, n_threads) as runner, probs.open("wb") as out:
            tokens = runner.tokenize(text.text)
            if len(tokens) < 2:
                raise QualityError("the calibration text has fewer than two tokens")
            n_scored = len(tokens) - 1
            neg_entropy, nll = np.empty(n_scored), np.empty(n_scored)
            argmax = np.empty(n_scored, dtype=np.int64)
            bar = progress(len(tokens), f"reference {file_type}", "tok")
            for positions, rows in _scored_chunks(runner, tokens, n_scored):
                p, neg_entropy[positions], nll[positions] = reference_rows(
                    rows, _next(tokens, positions)
                )
                p.tofile(out)
                argmax[positions] = rows.argmax(-1)
                bar.update(len(positions))
            bar.update(1)  # the last token: its logits are not scored
            bar.close()
            n_vocab = runner.n_vocab
        if not (np.isfinite(neg_entropy).all() and np.isfinite(nll).all()):
            raise QualityError(f"{source.name} gives non-finite log-probabilities")
        return cls(
            source, probs, text, file_type, tokens, n_vocab, neg_entropy, argmax,
            float(nll.mean()), time.monotonic() - started, n_threads,
        )  # fmt: skip

    def compare(self, model: Path, quant: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per scored position: KL(reference ‖ model), top-1 agreement, -log p(next token).

        Raises:
            QualityError: llama.cpp failed, the vocabularies differ, or the figures are not
                finite (NaN/inf logits).
        """
        kl, nll = np.empty(self.n_scored), np.empty(self.n_scored)
        top1 = np.empty(self.n_scored, dtype=bool)
        with LogitsRunner(model, self.n_threads) as runner, self.probs.open("rb") as ref:
            if runner.n_vocab != self.n_vocab:
                raise QualityError(
                    f"{model.name} has {runner.n_vocab} tokens, the reference {self.n_vocab}"
                )
            bar = progress(len(self.tokens), f"measure {quant}", "tok")
            for positions, rows in _scored_chunks(runner, self.tokens, self.n_scored):
                p = _read_rows(ref, len(positions), self.n_vocab)
                kl[positions], nll[positions] = compare_rows(
                    p, self.neg_entropy[positions], rows, _next(self.tokens, positions)
                )
                top1[positions] = rows.argmax(-1) == self.argmax[positions]
                bar.update(len(positions))
            bar.update(1)
            bar.close()
        if not (np.isfinite(kl).all() and np.isfinite(nll).all()):
            raise QualityError(f"{model.name} gives non-finite log-probabilities")
        return np.maximum(kl, 0.0), top1, nll  # KL ≥ 0; float rounding can give -1e-9


def reference_rows(
    logits: np.ndarray, next_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference logits (k, V) → float32 probabilities (k, V), sum p·log p (k,) and
    -log p(next token) (k,), in float64 (done once, so precision costs nothing here)."""
    logp = logits.astype(np.float64)
    logp -= logp.max(axis=-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=-1, keepdims=True))
    p = np.exp(logp).astype(np.float32)
    neg_entropy = (p * logp).sum(-1)  # with the stored p, so that KL(p ‖ p) is 0
    return p, neg_entropy, -logp[np.arange(len(logp)), next_ids]


def compare_rows(
    p: np.ndarray, neg_entropy: np.ndarray, logits: np.ndarray, next_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """KL(p ‖ softmax(logits)) (k,) and -log q(next token) (k,).

    KL = sum p log p - sum p log q, with log q = z - lse(z) for logits z shifted by their
    max: float32 element-wise work (numpy's pairwise sums keep ~1e-6 absolute error),
    per-row totals in float64. (k, V) float32 inputs.
    """
    z = logits - logits.max(axis=-1, keepdims=True)  # (k, V) float32, ≤ 0
    lse = np.log(np.exp(z).sum(axis=-1, dtype=np.float64))  # (k,)
    cross = (p * z).sum(axis=-1, dtype=np.float64) - lse * p.sum(axis=-1, dtype=np.float64)
    return neg_entropy - cross, lse - z[np.arange(len(z)), next_ids]


def _scored_chunks(
    runner: LogitsRunner, tokens: list[int], n_scored: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(positions, float32 logits rows) in chunks of ≤ ROW_CHUNK scored positions."""
    for start, rows in runner.logits(tokens):
        for lo in range(0, len(rows), ROW_CHUNK):
            positions = np.arange(start + lo, min(start + lo + ROW_CHUNK, start + len(rows)))
            positions = positions[positions < n_scored]
            if len(positions):
                yield positions, rows[lo : lo + len(positions)]


def _next(tokens: list[int], positions: np.ndarray) -> np.ndarray:
    return np.asarray(tokens, dtype=np.int64)[positions + 1]


def _read_rows(handle: BinaryIO, n_rows: int, n_vocab: int) -> np.ndarray:
    data = np.fromfile(handle, dtype=np.float32, count=n_rows * n_vocab)
    if data.size != n_rows * n_vocab:
        raise QualityError("the reference probabilities file is truncated")
    return data.reshape(n_rows, n_vocab)


def source_file_type(path: Path) -> str:
    """The GGUF's ``general.file_type`` as llama.cpp names it ("F32", "BF16", "Q8_0"...)."""
    import gguf

    value = (read_metadata(path, "general.file_type") or {}).get("general.file_type")
    if not isinstance(value, int):
        return "unknown"
    try:
        name = gguf.LlamaFileType(value).name
    except ValueError:
        return f"ftype {value}"
    return name.removeprefix("ALL_").removeprefix("MOSTLY_")
