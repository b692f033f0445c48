"""What the converter writes: hparams, vocabulary, special tokens, template, mmproj keys,
general.* metadata (byte-for-byte parity with llama.cpp's converter: test_upstream_parity.py)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from ggufserve.converters.checkpoint import Checkpoint
from ggufserve.converters.convert import ConversionResult, convert
from ggufserve.converters.errors import VocabError
from ggufserve.converters.metadata import general_metadata
from ggufserve.converters.vocab import added_token, load_sentencepiece_vocab
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
    assert f["general.name"] == "text"  # the given --name (llama.cpp's --model-name)
    assert f["general.size_label"] == "17M"  # 262,144 × 64 embedding + 6 small layers
    assert f["general.file_type"] == gguf.LlamaFileType.ALL_F32
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
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_space_prefix": False,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }
    for key, value in expected.items():
        assert f[key] == pytest.approx(value), key
    # llama.cpp finds <end_of_turn> (106) by its text; its converter writes no EOT id.
    assert "tokenizer.ggml.eot_token_id" not in f
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


def test_multimodal_vocab_has_a_token_per_embedding_row(
    converted: dict[str, ConversionResult],
) -> None:
    path = converted["mm-f32"].text
    f = fields(path)
    # 262,208 embedding rows (vocab_size), all kept as llama.cpp's converter keeps them:
    # 262,144 pieces + <image_soft_token>, then [PAD<id>] tokens of type UNUSED.
    types = f["tokenizer.ggml.token_type"]
    assert len(types) == 262_208
    assert f["tensors"]["token_embd.weight"][0] == (64, 262_208)
    assert not any(name.startswith(("v.", "mm.")) for name in f["tensors"])
    reader = gguf.GGUFReader(path)
    tokens = reader.fields["tokenizer.ggml.tokens"]
    scores = reader.fields["tokenizer.ggml.scores"]
    for token_id, text, kind, score in [
        (262_144, "<image_soft_token>", gguf.TokenType.CONTROL, -1000.0),
        (262_145, "[PAD262145]", gguf.TokenType.UNUSED, -10_000.0),
        (262_207, "[PAD262207]", gguf.TokenType.UNUSED, -10_000.0),
    ]:
        assert bytes(tokens.parts[tokens.data[token_id]]).decode() == text
        assert types[token_id] == kind
        assert float(scores.parts[scores.data[token_id]][0]) == score


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
        # (112 / 14) / sqrt(16 tokens); written because it is not clip.cpp's default 4.
        "clip.vision.projector.scale_factor": 2,
        "clip.use_gelu": True,
        "general.file_type": gguf.LlamaFileType.ALL_F32,
        "general.quantization_version": gguf.GGML_QUANT_VERSION,
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


def checkpoint_folder(folder: Path, files: dict[str, Any]) -> Checkpoint:
    """A Checkpoint of JSON/text files only (no tensors): enough for metadata and vocab."""
    folder.mkdir(parents=True)
    for name, content in files.items():
        text = content if isinstance(content, str) else json.dumps(content)
        (folder / name).write_text(text, encoding="utf-8")
    return Checkpoint(folder, files.get("config.json", {}), {})


def test_general_metadata_as_llama_cpp_fills_it(tmp_path: Path) -> None:
    card = "---\nlicense: apache-2.0\ntags:\n- tiny\n---\n# Tiny\n"
    generation = {"top_k": 20, "top_p": 0.8, "temperature": 0.7, "repetition_penalty": 1.05}
    ckpt = checkpoint_folder(
        tmp_path / "tiny-gemma-3-it",
        {"config.json": {}, "README.md": card, "generation_config.json": generation},
    )
    dense = general_metadata(ckpt, (16_900_000, 16_900_000, 0, 0), name=None, repo_id=None)
    # The heuristics' name (here from the folder), not the folder name verbatim.
    assert dense.name == gguf.Metadata.load(None, ckpt.root, None, 16_900_000).name
    assert dense.size_label == "17M"
    assert dense.license == "apache-2.0" and dense.tags == ["tiny"]
    assert (dense.sampling_top_k, dense.sampling_temp) == (20, 0.7)
    # Newer gguf-py (llama.cpp's own) maps HF's repetition_penalty too.
    assert dense.sampling_penalty_repeat == 1.05
    # Experts: "<count>x<size of one expert's share>", as gguf.size_label.
    moe = general_metadata(ckpt, (80_000_000, 20_000_000, 10_000_000, 4), name=None, repo_id=None)
    assert moe.size_label == gguf.size_label(80_000_000, 20_000_000, 10_000_000, 4) == "4x30M"
    named = general_metadata(ckpt, (1, 1, 0, 0), name="my-model", repo_id=None)
    assert named.name == "my-model"
    hub = general_metadata(ckpt, (1, 1, 0, 0), name=None, repo_id="org/tiny-gemma-3-it")
    assert hub.name == "org/tiny-gemma-3-it"  # as llama.cpp's --remote
    assert hub.source_repo_url == "https://huggingface.co/org/tiny-gemma-3-it"


@pytest.mark.parametrize(
    ("text", "special", "expected"),
    [
        ("<|fim_prefix|>", False, ("<|fim_prefix|>", gguf.TokenType.CONTROL)),  # looks special
        ("<unused7>", False, ("<unused7>", gguf.TokenType.CONTROL)),
        ("<mask>", False, ("<mask>", gguf.TokenType.CONTROL)),
        ("<tool_call>", False, ("<tool_call>", gguf.TokenType.USER_DEFINED)),
        ("<tool_call>", True, ("<tool_call>", gguf.TokenType.CONTROL)),
        ("\u2581\u2581", False, ("  ", gguf.TokenType.USER_DEFINED)),  # matched on raw text
    ],
)
def test_added_token_types_as_llama_cpp(
    text: str, special: bool, expected: tuple[str, gguf.TokenType]
) -> None:
    assert added_token(text, special) == expected


def test_sentencepiece_vocab_has_one_token_per_row(tmp_path: Path) -> None:
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "<0x41>", "\u2581a", "b"]
    tokenizer = {
        "model": {
            "type": "BPE",
            "vocab": {p: i for i, p in enumerate(pieces)},
            "unk_token": "<unk>",
        }
    }
    decoder = {
        "4": {"content": "<0x41>", "special": True},  # a byte piece stays a byte
        "8": {"content": "<start_of_turn>", "special": True},  # id 7 is left a gap
        "9": {"content": "\u2581\u2581", "special": False},
        "12": {"content": "<image_soft_token>", "special": True},  # past vocab_size
    }
    ckpt = checkpoint_folder(
        tmp_path / "ckpt",
        {"tokenizer.json": tokenizer, "tokenizer_config.json": {"added_tokens_decoder": decoder}},
    )
    vocab = load_sentencepiece_vocab(ckpt, 11)
    assert len(vocab) == 11
    assert vocab.tokens[4:] == [
        "<0x41>",
        "\u2581a",
        "b",
        "[PAD7]",
        "<start_of_turn>",
        "  ",
        "[PAD10]",
    ]
    t = gguf.TokenType
    assert vocab.types[4:] == [
        t.BYTE,
        t.NORMAL,
        t.NORMAL,
        t.UNUSED,
        t.CONTROL,
        t.USER_DEFINED,
        t.UNUSED,
    ]
    assert vocab.scores[7:] == [-10_000.0, -1000.0, -1000.0, -10_000.0]
    with pytest.raises(VocabError, match="tokenizer has 7 tokens but vocab_size is 6"):
        load_sentencepiece_vocab(ckpt, 6)
