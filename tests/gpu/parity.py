"""Device-vs-CPU parity of one GGUF, each side in its own child process.

The reference side runs on the CPU only (``CUDA_VISIBLE_DEVICES=""``, no layer offloaded,
mtmd without GPU); the device side offloads every layer (``n_gpu_layers=-1``, mtmd on the
GPU). On a CPU build both sides are the CPU (the dry run checks the harness itself).

- Tokens: the reference decodes :data:`N_TOKENS` greedy tokens one at a time; the device
  side decodes the same tokens (teacher forcing), so its argmax at each step says where a
  free-running greedy decode on the device would first differ, and the logits of every
  step are comparable.
- Logprobs: log-softmax of both sides' logits at each step; the difference for the
  reference's token and the largest over the reference's top :data:`TOP_K`.
- Image embeddings: mtmd's output for the same images on both sides; cosine per image
  token row.

``python -m tests.gpu.parity child ...`` is the child; :func:`compare_tokens` and
:func:`compare_embeddings` are what the tests call.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests.conftest import REPO

N_TOKENS = 32
TOP_K = 10
PROMPT = "The lighthouse keeper climbed the stairs and"
CHILD_TIMEOUT_S = 300


@dataclass(frozen=True)
class TokenParity:
    """What one model's two sides produced over :data:`N_TOKENS` steps.

    Attributes:
        tokens: The reference's greedy tokens.
        identical: Leading steps where the device's argmax equals the reference's token.
        margin_at_divergence: The reference's top-1 minus top-2 logit at the first differing
            step (None when all agree): a near tie, if small.
        max_abs_logit: Largest |device - reference| logit over every step and token.
        logit_std: Standard deviation of the reference's logits (the scale of the above).
        max_chosen_logprob: Largest |Δ log p| of the reference's token over the steps, nats.
        max_topk_logprob: Largest |Δ log p| over the reference's top-K tokens, nats.
    """

    tokens: list[int]
    identical: int
    margin_at_divergence: float | None
    max_abs_logit: float
    logit_std: float
    max_chosen_logprob: float
    max_topk_logprob: float


@dataclass(frozen=True)
class EmbeddingParity:
    """mtmd's image embeddings, device vs reference: the smallest cosine over every image
    token row, the cosine of each whole image, and the rows' shape."""

    min_row_cosine: float
    image_cosines: list[float]
    shape: list[int]


def log_softmax(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    top = rows.max(axis=-1, keepdims=True)
    return rows - top - np.log(np.exp(rows - top).sum(axis=-1, keepdims=True))


def compare_logits(tokens: list[int], reference: np.ndarray, device: np.ndarray) -> TokenParity:
    """``reference`` and ``device``: (steps, n_vocab) logits for the same token prefix."""
    picks = device.argmax(axis=-1)
    agree = picks == np.asarray(tokens)
    identical = int(agree.size if agree.all() else agree.argmin())
    margin = None
    if identical < len(tokens):
        top2 = np.sort(reference[identical])[-2:]
        margin = float(top2[1] - top2[0])
    lp_ref, lp_dev = log_softmax(reference), log_softmax(device)
    steps = np.arange(len(tokens))
    chosen = np.abs(lp_dev[steps, tokens] - lp_ref[steps, tokens])
    top = np.argsort(reference, axis=-1)[:, -TOP_K:]
    topk = np.abs(np.take_along_axis(lp_dev, top, -1) - np.take_along_axis(lp_ref, top, -1))
    return TokenParity(
        tokens=[int(t) for t in tokens],
        identical=identical,
        margin_at_divergence=margin,
        max_abs_logit=float(np.abs(device - reference).max()),
        logit_std=float(reference.std()),
        max_chosen_logprob=float(chosen.max()),
        max_topk_logprob=float(topk.max()),
    )


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of matching rows (last axis)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def compare_images(reference: list[np.ndarray], device: list[np.ndarray]) -> EmbeddingParity:
    pairs = list(zip(reference, device, strict=True))
    rows = [cosine(r, d) for r, d in pairs]
    return EmbeddingParity(
        min_row_cosine=float(min(r.min() for r in rows)),
        image_cosines=[float(cosine(r.ravel(), d.ravel())) for r, d in pairs],
        shape=list(reference[0].shape),
    )


def _run_child(args: list[str], device: bool, log: Path) -> None:
    """One side in a child; the reference side sees no CUDA device at all."""
    env = dict(os.environ)
    if not device:
        env["CUDA_VISIBLE_DEVICES"] = ""
    command = [sys.executable, "-m", "tests.gpu.parity", "child", *args]
    command += ["--n-gpu-layers", "-1" if device else "0"]
    with log.open("ab") as out:
        subprocess.run(
            command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
            check=True, timeout=CHILD_TIMEOUT_S,
        )  # fmt: skip


def compare_tokens(gguf: Path, log: Path) -> TokenParity:
    """Greedy tokens and logprobs of ``gguf``, device vs reference."""
    with tempfile.TemporaryDirectory() as tmp:
        ref, dev = Path(tmp) / "ref.npz", Path(tmp) / "dev.npz"
        _run_child(["tokens", str(gguf), "--out", str(ref)], False, log)
        reference = np.load(ref)
        follow = Path(tmp) / "tokens.json"
        follow.write_text(json.dumps(reference["tokens"].tolist()))
        _run_child(["tokens", str(gguf), "--out", str(dev), "--follow", str(follow)], True, log)
        device = np.load(dev)
        return compare_logits(reference["tokens"].tolist(), reference["logits"], device["logits"])


def parity_images() -> list[np.ndarray]:
    """Two seeded RGB uint8 images (H, W, 3): a gradient and noise."""
    generator = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 112, dtype=np.float64)
    gradient = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], 255 - ramp[:, None]), -1)
    noise = generator.integers(0, 256, size=(112, 112, 3))
    return [gradient.astype(np.uint8), noise.astype(np.uint8)]


def compare_embeddings(gguf: Path, mmproj: Path, log: Path) -> EmbeddingParity:
    """mtmd image embeddings of :func:`parity_images`, device vs reference."""
    with tempfile.TemporaryDirectory() as tmp:
        sides = []
        for device in (False, True):
            out = Path(tmp) / f"{'dev' if device else 'ref'}.npy"
            args = ["images", str(gguf), "--mmproj", str(mmproj), "--out", str(out)]
            _run_child(args, device, log)
            sides.append(list(np.load(out)))
        return compare_images(sides[0], sides[1])


# -- the child ---------------------------------------------------------------------------


def _last_logits(llama: object, n_vocab: int) -> np.ndarray:
    import llama_cpp

    row = llama_cpp.llama_get_logits_ith(llama.ctx, -1)  # type: ignore[attr-defined]
    return np.ctypeslib.as_array(row, shape=(n_vocab,)).copy()


def child_tokens(gguf: str, n_gpu_layers: int, out: str, follow: str | None) -> None:
    """Decode :data:`N_TOKENS` steps one token at a time (greedy, or ``follow``'s tokens)."""
    import llama_cpp

    llama = llama_cpp.Llama(gguf, n_ctx=256, n_gpu_layers=n_gpu_layers, verbose=False, seed=0)
    forced = json.loads(Path(follow).read_text()) if follow else None
    n_vocab = llama.n_vocab()
    llama.eval(llama.tokenize(PROMPT.encode(), add_bos=True))
    rows, tokens = [], []
    for step in range(N_TOKENS):
        rows.append(_last_logits(llama, n_vocab))
        tokens.append(forced[step] if forced else int(rows[-1].argmax()))
        llama.eval([tokens[-1]])
    np.savez(out, tokens=np.array(tokens), logits=np.array(rows, dtype=np.float32))
    llama.close()


def child_images(gguf: str, mmproj: str, n_gpu_layers: int, out: str) -> None:
    """mtmd's embeddings of :func:`parity_images`, with mtmd on the GPU when layers are."""
    import llama_cpp
    from llama_cpp import mtmd_cpp

    from tests.converters import mtmd_embed

    llama = llama_cpp.Llama(gguf, n_ctx=256, n_gpu_layers=n_gpu_layers, verbose=False)
    params = mtmd_cpp.mtmd_context_params_default()
    params.use_gpu = n_gpu_layers != 0
    params.print_timings = False
    params.warmup = False
    ctx = mtmd_cpp.mtmd_init_from_file(mmproj.encode(), llama._model.model, params)
    assert ctx, "mtmd could not load the mmproj"
    n_embd = llama_cpp.llama_model_n_embd_inp(llama._model.model)
    try:
        rows = [mtmd_embed._encode(ctx, image, n_embd) for image in parity_images()]
    finally:
        mtmd_cpp.mtmd_free(ctx)
    np.save(out, np.stack(rows))  # (images, image tokens, n_embd_inp)
    llama.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["child"])
    parser.add_argument("what", choices=["tokens", "images"])
    parser.add_argument("gguf")
    parser.add_argument("--n-gpu-layers", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--follow", help="JSON list of tokens to decode instead of greedy")
    parser.add_argument("--mmproj")
    args = parser.parse_args(argv)
    if args.what == "tokens":
        child_tokens(args.gguf, args.n_gpu_layers, args.out, args.follow)
    else:
        child_images(args.gguf, args.mmproj, args.n_gpu_layers, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
