"""Qwen3-VL conversion: metadata written, both stored expert layouts, refused configs,
and convert → quantize → --register → serve an image chat over HTTP."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import httpx
import pytest

from ggufserve.converters.__main__ import main
from ggufserve.converters.convert import ConversionResult, convert
from ggufserve.converters.errors import ConfigError, VocabError
from tests.conftest import RunningServer
from tests.converters.qwen_builders import (
    CHAT_TEMPLATE,
    MOE_CONFIG,
    VISION_CONFIG,
)
from tests.converters.test_gguf_metadata import fields
from tests.e2e.test_vision import data_uri, png

# llama.cpp's end-of-generation tokens for Qwen: <|endoftext|>, <|im_end|>, <|fim_pad|>,
# <|repo_name|>, <|file_sep|>; biased away so the random tiny models keep generating.
QWEN_NO_EOG = {str(t): -100 for t in (151643, 151645, 151662, 151663, 151664)}


def test_moe_text_metadata(qwen_converted: dict[str, ConversionResult]) -> None:
    f = fields(qwen_converted["moe-f32"].text)
    c = MOE_CONFIG
    expected = {
        "general.architecture": "qwen3vlmoe",
        "qwen3vlmoe.context_length": c["max_position_embeddings"],
        "qwen3vlmoe.embedding_length": c["hidden_size"],
        "qwen3vlmoe.block_count": c["num_hidden_layers"],
        "qwen3vlmoe.attention.head_count": c["num_attention_heads"],
        "qwen3vlmoe.attention.head_count_kv": c["num_key_value_heads"],
        "qwen3vlmoe.attention.key_length": c["head_dim"],
        "qwen3vlmoe.rope.freq_base": c["rope_parameters"]["rope_theta"],
        "qwen3vlmoe.rope.dimension_sections": [*c["rope_parameters"]["mrope_section"], 0],
        "qwen3vlmoe.n_deepstack_layers": len(VISION_CONFIG["deepstack_visual_indexes"]),
        "qwen3vlmoe.expert_count": c["num_experts"],
        "qwen3vlmoe.expert_used_count": c["num_experts_per_tok"],
        "qwen3vlmoe.expert_feed_forward_length": c["moe_intermediate_size"],
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": c["vocab_size"],
        "tokenizer.ggml.eos_token_id": 151645,
        "tokenizer.ggml.padding_token_id": 151643,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }
    for key, value in expected.items():
        assert f[key] == value, key
    types = f["tokenizer.ggml.token_type"]
    assert types[0] == gguf.TokenType.NORMAL
    assert types[151645] == gguf.TokenType.CONTROL  # <|im_end|>
    assert types[151655] == gguf.TokenType.CONTROL  # <|image_pad|>
    assert types[151667] == gguf.TokenType.USER_DEFINED  # <think>: not special
    assert types[151669] == gguf.TokenType.UNUSED  # padding row past the tokenizer
    assert len(f["tokenizer.ggml.merges"]) > 150_000
    e, n, ff = c["num_experts"], c["hidden_size"], c["moe_intermediate_size"]
    tensors = f["tensors"]
    # GGML ne order (reverse of PyTorch's): [n_embd, n_ff_exp, n_expert] for gate/up.
    assert tensors["blk.0.ffn_gate_exps.weight"] == ((n, ff, e), "F32")
    assert tensors["blk.0.ffn_up_exps.weight"] == ((n, ff, e), "F32")
    assert tensors["blk.0.ffn_down_exps.weight"] == ((ff, n, e), "F32")
    assert tensors["blk.0.ffn_gate_inp.weight"] == ((n, e), "F32")
    assert "output.weight" in tensors  # untied


def test_dense_is_tied_and_f16_keeps_norms_f32(
    qwen_converted: dict[str, ConversionResult],
) -> None:
    tensors = fields(qwen_converted["dense-f16"].text)["tensors"]
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert tensors["token_embd.weight"][1] == "F16"
    assert tensors["blk.0.attn_norm.weight"][1] == "F32"
    assert "blk.0.ffn_gate.weight" in tensors and "blk.0.ffn_gate_exps.weight" not in tensors


def test_mmproj_metadata(qwen_converted: dict[str, ConversionResult]) -> None:
    mmproj = qwen_converted["dense-f16"].mmproj
    assert mmproj is not None
    f = fields(mmproj)
    v = VISION_CONFIG
    depth = v["depth"]
    expected = {
        "general.architecture": "clip",
        "clip.projector_type": "qwen3vl_merger",
        "clip.vision.projection_dim": v["out_hidden_size"],
        "clip.vision.image_size": 8 * v["patch_size"],  # sqrt(64 positions) × patch
        "clip.vision.patch_size": v["patch_size"],
        "clip.vision.embedding_length": v["hidden_size"],
        "clip.vision.feed_forward_length": v["intermediate_size"],
        "clip.vision.block_count": depth,
        "clip.vision.attention.head_count": v["num_heads"],
        "clip.vision.spatial_merge_size": v["spatial_merge_size"],
        "clip.vision.is_deepstack_layers": [
            i in v["deepstack_visual_indexes"] for i in range(depth)
        ],
        "clip.use_gelu": True,
    }
    for key, value in expected.items():
        assert f[key] == value, key
    # Not written, as by llama.cpp's converter: clip.cpp fixes Qwen3-VL's pixel limits itself.
    assert "clip.vision.image_min_pixels" not in f and "clip.vision.image_max_pixels" not in f
    tensors = f["tensors"]
    p, hid, merged = v["patch_size"], v["hidden_size"], 4 * v["hidden_size"]
    # The Conv3D (hid, 3, 2, p, p) becomes two Conv2D kernels, F16 in an F16 mmproj (F32
    # otherwise), as llama.cpp's converter writes them.
    assert tensors["v.patch_embd.weight"] == ((p, p, 3, hid), "F16")
    assert tensors["v.patch_embd.weight.1"] == ((p, p, 3, hid), "F16")
    f32 = qwen_converted["dense-f32"].mmproj
    assert f32 is not None
    assert fields(f32)["tensors"]["v.patch_embd.weight"] == ((p, p, 3, hid), "F32")
    assert tensors["v.position_embd.weight"][1] == "F32"
    assert tensors["v.blk.0.attn_qkv.weight"] == ((hid, 3 * hid), "F16")
    assert tensors["mm.0.weight"] == ((merged, merged), "F16")
    assert tensors["mm.2.weight"] == ((merged, v["out_hidden_size"]), "F16")
    assert tensors["v.post_ln.weight"] == ((hid,), "F32")
    # Deepstack mergers are named by the ViT block they read (1 and 2), not list order.
    assert {name.split(".")[2] for name in tensors if name.startswith("v.deepstack.")} == {"1", "2"}


def copy_checkpoint(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".complete"))
    return target


def edit_config(folder: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_in_memory_expert_layout_converts_to_the_same_file(
    qwen_ckpt: dict[str, Path], qwen_converted: dict[str, ConversionResult], tmp_path: Path
) -> None:
    """A checkpoint saved from transformers 5's in-memory model stores experts as
    (E, 2·n_ff, n_embd) / (E, n_embd, n_ff): the same weights give the same GGUF bytes."""
    from safetensors.numpy import load_file, save_file

    # Same folder name: gguf-py's metadata heuristics read it (basename, size label).
    folder = copy_checkpoint(qwen_ckpt["moe"], tmp_path / qwen_ckpt["moe"].name)
    tensors = load_file(folder / "model.safetensors")
    for name in tensors:
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[name] = tensors[name].transpose(0, 2, 1).copy()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    result = convert(
        str(folder), out_dir=tmp_path / "out", name="moe", outtype="f32", mmproj_type="f32"
    )
    assert sha256(result.text) == sha256(qwen_converted["moe-f32"].text)


def _text(config: dict[str, Any]) -> dict[str, Any]:
    return config["text_config"]


BAD_CONFIGS: dict[str, tuple[str, Callable[[dict[str, Any]], None], str]] = {
    "mrope-sum": (
        "dense",
        lambda c: _text(c)["rope_parameters"].update(mrope_section=[4, 3, 2]),
        "must sum to head_dim / 2",
    ),
    "yarn": (
        "dense",
        lambda c: _text(c)["rope_parameters"].update(rope_type="yarn"),
        "rope_type 'yarn'",
    ),
    "not-interleaved": (
        "dense",
        lambda c: _text(c)["rope_parameters"].update(mrope_interleaved=False),
        "interleaved",
    ),
    "untied-without-lm-head": (
        "dense",
        lambda c: c.update(tie_word_embeddings=False),
        "lm_head is missing",
    ),
    "temporal-patch": (
        "dense",
        lambda c: c["vision_config"].update(temporal_patch_size=3),
        "temporal_patch_size",
    ),
    "deepstack-index": (
        "dense",
        lambda c: c["vision_config"].update(deepstack_visual_indexes=[1, 9]),
        "deepstack_visual_indexes",
    ),
    "merger-width": (
        "dense",
        lambda c: c["vision_config"].update(out_hidden_size=32),
        "out_hidden_size",
    ),
    "topk-not-normalised": (
        "moe",
        lambda c: _text(c).update(norm_topk_prob=False),
        "norm_topk_prob",
    ),
    "dense-layers-in-moe": (
        "moe",
        lambda c: _text(c).update(mlp_only_layers=[0]),
        "every layer must be MoE",
    ),
    "ambiguous-expert-layout": (
        "moe",
        lambda c: _text(c).update(moe_intermediate_size=32),
        "cannot be told apart",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_unsupported_configs_are_named_errors(
    qwen_ckpt: dict[str, Path], tmp_path: Path, case: str
) -> None:
    variant, edit, message = BAD_CONFIGS[case]
    folder = copy_checkpoint(qwen_ckpt[variant], tmp_path / "ckpt")
    edit_config(folder, edit)
    with pytest.raises(ConfigError, match=message):
        convert(str(folder), out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_pre_tokenizer_is_a_vocab_error(qwen_ckpt: dict[str, Path], tmp_path: Path) -> None:
    folder = copy_checkpoint(qwen_ckpt["dense"], tmp_path / "ckpt")
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text())
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\S+"
    path.write_text(json.dumps(data))
    with pytest.raises(VocabError, match="pre-tokenizer"):
        convert(str(folder), out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_convert_quantize_register_then_serve_images(
    qwen_ckpt: dict[str, Path], tmp_path: Path, server_factory: Callable[..., RunningServer]
) -> None:
    models = tmp_path / "models.yaml"
    models.write_text("models:\n  - id: other\n    gguf: {path: other.gguf}\n")
    out = tmp_path / "out"
    for variant, ckpt in qwen_ckpt.items():
        args = ["convert", str(ckpt), "--out", str(out), "--name", f"qwen-{variant}"]
        args += ["--quant", "Q4_K_M", "--quant", "Q8_0", "--register", "--models", str(models)]
        assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "mmproj-qwen-dense-F16.gguf",
        "mmproj-qwen-moe-F16.gguf",
        "qwen-dense-F32.gguf",
        "qwen-dense-Q4_K_M.gguf",
        "qwen-dense-Q4_K_M.gguf.quality.json",
        "qwen-dense-Q8_0.gguf",
        "qwen-dense-Q8_0.gguf.quality.json",
        "qwen-moe-F32.gguf",
        "qwen-moe-Q4_K_M.gguf",
        "qwen-moe-Q4_K_M.gguf.quality.json",
        "qwen-moe-Q8_0.gguf",
        "qwen-moe-Q8_0.gguf.quality.json",
    ]
    running = server_factory(
        [{"id": "qwen-dense"}, {"id": "qwen-moe"}], models_file=models, api_key=None
    )
    cards = httpx.get(f"{running.v1}/models", timeout=30).json()["data"]
    assert {c["id"]: c["capabilities"] for c in cards}["qwen-moe"] == [
        "completion",
        "vision",
        "tools",
    ]
    for model in ("qwen-dense", "qwen-moe"):
        usage = []
        picture = {"type": "image_url", "image_url": {"url": data_uri(png((200, 9, 9), (128, 96)))}}
        for parts in ([], [picture]):
            message = {"role": "user", "content": [*parts, {"type": "text", "text": "What?"}]}
            body = {"model": model, "messages": [message], "max_tokens": 3}
            body["logit_bias"] = QWEN_NO_EOG
            response = httpx.post(f"{running.v1}/chat/completions", json=body, timeout=60)
            assert response.status_code == 200, response.text
            usage.append(response.json()["usage"])
        assert usage[1]["completion_tokens"] == 3
        # 128×96 → 4×3 merged patches: 12 image tokens + <|vision_start|> + <|vision_end|>.
        assert usage[1]["prompt_tokens"] - usage[0]["prompt_tokens"] == 12 + 2
