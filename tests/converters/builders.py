"""Tiny random-weight checkpoints with the real Gemma 3 vocabulary, built with
transformers and cached on disk (``$GGUFSERVE_TEST_CACHE``, default
``~/.cache/ggufserve-tests``) under a key of their recipe."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf

CACHE = Path(os.environ.get("GGUFSERVE_TEST_CACHE", Path.home() / ".cache" / "ggufserve-tests"))
# Gemma 3's turn format; image parts render as <start_of_image> as in Gemma 3's own template.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] | trim }}{% else %}"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}<start_of_image>"
    "{% else %}{{ p['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# Small seeded shapes; query_pre_attn_scalar = head_dim and 6 layers (5 local : 1 global)
# so llama.cpp's gemma3 graph is the same computation (CONVERTER_NOTES.md).
TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 262_144,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "query_pre_attn_scalar": 16,
    "sliding_window": 16,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
}
VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 112,
    "patch_size": 14,
    "vision_use_head": False,
}
MM_TOKENS_PER_IMAGE = 16


def cached(name: str, recipe: dict[str, Any], build: Callable[[Path], None]) -> Path:
    """Build once into the cache; the key covers the recipe and this module's source."""
    source = inspect.getsource(inspect.getmodule(cached))  # type: ignore[arg-type]
    key = hashlib.sha256((json.dumps(recipe, sort_keys=True) + source).encode()).hexdigest()[:16]
    path = CACHE / f"{name}-{key}"
    if (path / ".complete").is_file():
        return path
    shutil.rmtree(path, ignore_errors=True)
    tmp = CACHE / f".{name}-{key}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    (tmp / ".complete").write_text("ok")
    tmp.rename(path)
    return path


def gguf_vocab(path: Path) -> tuple[list[str], list[float], list[int]]:
    """tokens, scores, token types stored in a GGUF (``tokenizer.ggml.*``)."""
    reader = gguf.GGUFReader(path)
    fields = reader.fields
    tokens = [
        bytes(fields["tokenizer.ggml.tokens"].parts[i]).decode()
        for i in fields["tokenizer.ggml.tokens"].data
    ]
    scores = [
        float(fields["tokenizer.ggml.scores"].parts[i][0])
        for i in fields["tokenizer.ggml.scores"].data
    ]
    types = [
        int(fields["tokenizer.ggml.token_type"].parts[i][0])
        for i in fields["tokenizer.ggml.token_type"].data
    ]
    return tokens, scores, types


def write_sentencepiece_model(
    path: Path, tokens: list[str], scores: list[float], types: list[int]
) -> None:
    """A SentencePiece BPE model with byte fallback, as Gemma 3's ``tokenizer.model``."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = pb.ModelProto()
    for token, score, kind in zip(tokens, scores, types, strict=True):
        piece = model.pieces.add()
        piece.piece, piece.score, piece.type = token, score, kind
    trainer = model.trainer_spec
    trainer.model_type = pb.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = True
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = 3, 2, 1, 0
    normalizer = model.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = False
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    path.write_bytes(model.SerializeToString())


def write_gemma_tokenizer(
    folder: Path, bundled_gguf: Path, extra: dict[int, str] | None = None
) -> None:
    """tokenizer.model + tokenizer_config.json listing every control and user-defined token
    in ``added_tokens_decoder`` as the Hub files do; then let transformers write its
    tokenizer.json from them."""
    from transformers import AutoTokenizer

    tokens, scores, types = gguf_vocab(bundled_gguf)
    write_sentencepiece_model(folder / "tokenizer.model", tokens, scores, types)
    decoder = {
        str(i): {
            "content": t,
            "special": k == gguf.TokenType.CONTROL,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "single_word": False,
        }
        for i, (t, k) in enumerate(zip(tokens, types, strict=True))
        if k in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)
    }
    for token_id, text in (extra or {}).items():
        decoder[str(token_id)] = {
            "content": text,
            "special": True,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "single_word": False,
        }
    config = {
        "tokenizer_class": "GemmaTokenizer",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": TEXT_CONFIG["max_position_embeddings"],
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # Keep the Hub form of the config (save_pretrained may rewrite it).
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def randomise_zeros(model: Any, seed: int) -> None:
    """Gemma3ForConditionalGeneration initialises mm_input_projection_weight to zeros;
    zero tensors would make every image alike (CONVERTER_NOTES.md)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.numel() > 1 and not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
            elif param.dim() == 1:
                # Norm weights start at 0 or 1: perturb so the +1 fix-up is exercised.
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)


def build_gemma3_text(folder: Path, bundled_gguf: Path, seed: int = 0) -> None:
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(**TEXT_CONFIG)
    config.architectures = ["Gemma3ForCausalLM"]
    model = Gemma3ForCausalLM(config).eval()
    randomise_zeros(model, seed)
    model.save_pretrained(folder, safe_serialization=True)
    write_gemma_tokenizer(folder, bundled_gguf)


def build_gemma3_multimodal(folder: Path, bundled_gguf: Path, seed: int = 0) -> None:
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    text = {**TEXT_CONFIG, "vocab_size": 262_208}
    config = Gemma3Config(
        text_config=text, vision_config=VISION_CONFIG, mm_tokens_per_image=MM_TOKENS_PER_IMAGE
    )
    config.architectures = ["Gemma3ForConditionalGeneration"]
    model = Gemma3ForConditionalGeneration(config).eval()
    randomise_zeros(model, seed)
    model.save_pretrained(folder, safe_serialization=True)
    write_gemma_tokenizer(folder, bundled_gguf, extra={262_144: "<image_soft_token>"})
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "Gemma3ImageProcessor",
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5],
                "size": {
                    "height": VISION_CONFIG["image_size"],
                    "width": VISION_CONFIG["image_size"],
                },
                "do_pan_and_scan": False,
            }
        )
    )
