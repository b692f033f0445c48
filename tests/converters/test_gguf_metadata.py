"""What the converter writes: hparams, vocabulary, special tokens, template, mmproj keys."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from converters.convert import ConversionResult, convert
from tests.converters.builders import CHAT_TEMPLATE, TEXT_CONFIG, VISION_CONFIG


@functools.lru_cache(maxsize=8)
def fields(path: Path) -> dict[str, Any]:
    """Every KV and tensor (name → (ne, type)) of a GGUF; parsed once per file (slow:
    gguf-py reads the 262k-entry vocabulary arrays in Python)."""
    reader = gguf.GGUFReader(path)
    out: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if name.startswith("tokenizer.ggml.") and name.endswith(("tokens", "scores", "token_type")):
            out[name] = field.contents() if name.endswith("token_type") else len(field.data)
        else:
            out[name] = field.contents()
    out["tensors"] = {
        t.name: (tuple(int(x) for x in t.shape), t.tensor_type.name) for t in reader.tensors
    }
    return out


def test_text_hparams_and_vocab(converted: dict[str, ConversionResult]) -> None:
    f = fields(converted["text-f32"].text)
    c = TEXT_CONFIG
    assert f["general.architecture"] == "gemma3"
    assert f["general.type"] == "model"  # as llama.cpp's convert_hf_to_gguf.py writes
    expected = {
        "gemma3.context_length": c["max_position_embeddings"],
        "gemma3.embedding_length": c["hidden_size"],
        "gemma3.block_count": c["num_hidden_layers"],
        "gemma3.feed_forward_length": c["intermediate_size"],
        "gemma3.attention.head_count": c["num_attention_heads"],
        "gemma3.attention.head_count_kv": c["num_key_value_heads"],
        "gemma3.attention.key_length": c["head_dim"],
        "gemma3.attention.value_length": c["head_dim"],
        "gemma3.attention.sliding_window": c["sliding_window"],
        "gemma3.rope.freq_base": 1_000_000.0,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.unknown_token_id": 3,
        "tokenizer.ggml.eot_token_id": 106,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_space_prefix": False,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }
    for key, value in expected.items():
        assert f[key] == pytest.approx(value), key
    assert f["gemma3.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    types = np.array(f["tokenizer.ggml.token_type"])
    assert len(types) == 262_144
    # Gemma 3's real vocabulary: control and user-defined types survive the round trip.
    assert (types == gguf.TokenType.CONTROL).sum() == 6249
    assert (types == gguf.TokenType.USER_DEFINED).sum() == 165
    assert (types == gguf.TokenType.BYTE).sum() == 256


def test_text_tensors_types_and_shapes(converted: dict[str, ConversionResult]) -> None:
    t32 = fields(converted["text-f32"].text)["tensors"]
    t16 = fields(converted["text-f16"].text)["tensors"]
    n_layer = TEXT_CONFIG["num_hidden_layers"]
    assert len(t32) == 2 + 13 * n_layer  # token_embd, output_norm; 13 per block
    assert "output.weight" not in t32  # tied embeddings
    assert t32["token_embd.weight"] == ((64, 262_144), "F32")  # GGML ne: (n_embd, n_vocab)
    assert t16["token_embd.weight"] == ((64, 262_144), "F16")
    assert t16["blk.0.attn_q.weight"] == ((64, 64), "F16")
    assert t16["blk.0.attn_k.weight"] == ((64, 32), "F16")
    assert t16["blk.0.attn_q_norm.weight"] == ((16,), "F32")
    assert t16["blk.5.post_ffw_norm.weight"] == ((64,), "F32")


def test_multimodal_vocab_keeps_image_token_and_trims_padding(
    converted: dict[str, ConversionResult],
) -> None:
    f = fields(converted["mm-f32"].text)
    # 262,208 embedding rows in the checkpoint; 262,144 tokens + <image_soft_token> are real.
    assert len(f["tokenizer.ggml.token_type"]) == 262_145
    assert f["tensors"]["token_embd.weight"][0] == (64, 262_145)
    assert not any(name.startswith(("v.", "mm.")) for name in f["tensors"])


def test_mmproj_keys_and_tensors(converted: dict[str, ConversionResult]) -> None:
    mmproj = converted["mm-f32"].mmproj
    assert mmproj is not None
    f = fields(mmproj)
    v = VISION_CONFIG
    expected = {
        "general.architecture": "clip",
        "general.type": "mmproj",
        "clip.projector_type": "gemma3",
        "clip.has_vision_encoder": True,
        "clip.vision.image_size": v["image_size"],
        "clip.vision.patch_size": v["patch_size"],
        "clip.vision.embedding_length": v["hidden_size"],
        "clip.vision.feed_forward_length": v["intermediate_size"],
        "clip.vision.block_count": v["num_hidden_layers"],
        "clip.vision.attention.head_count": v["num_attention_heads"],
        "clip.vision.projection_dim": TEXT_CONFIG["hidden_size"],
        "clip.vision.projector.scale_factor": 2,  # (112 / 14) / sqrt(16 tokens)
        "clip.use_gelu": True,
    }
    for key, value in expected.items():
        assert f[key] == value, key
    assert f["clip.vision.image_mean"] == pytest.approx([0.5] * 3)
    tensors = f["tensors"]
    assert tensors["mm.input_projection.weight"] == ((64, 32), "F16")  # ne [n_embd_text, n_embd_v]
    assert tensors["mm.soft_emb_norm.weight"] == ((32,), "F32")
    assert tensors["v.patch_embd.weight"] == ((14, 14, 3, 32), "F32")
    assert tensors["v.position_embd.weight"] == ((32, 64), "F32")
    assert len(tensors) == 4 + 1 + 2 + 16 * v["num_hidden_layers"]


def test_mmproj_default_type_is_f16_and_names_follow_convention(
    gemma3_mm_ckpt: Path, tmp_path: Path
) -> None:
    result = convert(str(gemma3_mm_ckpt), out_dir=tmp_path, name="gemma-3-tiny")
    assert result.text.name == "gemma-3-tiny-F32.gguf"  # auto: the checkpoint is float32
    assert result.mmproj is not None and result.mmproj.name == "mmproj-gemma-3-tiny-F16.gguf"
    tensors = fields(result.mmproj)["tensors"]
    assert tensors["v.blk.0.attn_q.weight"][1] == "F16"
    assert tensors["v.blk.0.ln1.weight"][1] == "F32"
    assert sorted(p.name for p in tmp_path.iterdir()) == [result.text.name, result.mmproj.name]
