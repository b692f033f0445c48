"""The bundled real Gemma 3 270M GGUF, dequantized back into a Hugging Face checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import save_file

from tests.converters.builders import write_gemma_tokenizer

# GGUF block tensor → HF module path (the inverse of gguf-py's TensorNameMap for gemma3).
BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(name: str) -> str:
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    _, layer, kind, suffix = name.split(".")
    return f"model.layers.{layer}.{BLOCK_NAMES[kind]}.{suffix}"


def build_real_gemma3_270m(folder: Path, bundled_gguf: Path) -> None:
    """config.json, model.safetensors (float32), tokenizer.model, tokenizer_config.json."""
    reader = gguf.GGUFReader(bundled_gguf)
    tensors = {}
    for tensor in reader.tensors:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        data = data.reshape(tuple(int(x) for x in reversed(tensor.shape)))  # ne → numpy order
        if tensor.name.endswith("norm.weight"):
            data = data - 1.0  # llama.cpp stores Gemma's RMSNorm weight + 1
        tensors[hf_name(tensor.name)] = np.ascontiguousarray(data)
    save_file(tensors, str(folder / "model.safetensors"))

    def value(key: str) -> object:
        return reader.fields[key].contents()

    n_layer = int(value("gemma3.block_count"))  # type: ignore[call-overload]
    head_dim = int(value("gemma3.attention.key_length"))  # type: ignore[call-overload]
    config = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": tensors["model.embed_tokens.weight"].shape[0],
        "hidden_size": int(value("gemma3.embedding_length")),  # type: ignore[call-overload]
        "intermediate_size": int(value("gemma3.feed_forward_length")),  # type: ignore[call-overload]
        "num_hidden_layers": n_layer,
        "num_attention_heads": int(value("gemma3.attention.head_count")),  # type: ignore[call-overload]
        "num_key_value_heads": int(value("gemma3.attention.head_count_kv")),  # type: ignore[call-overload]
        "head_dim": head_dim,
        "query_pre_attn_scalar": head_dim,
        "sliding_window": int(value("gemma3.attention.sliding_window")),  # type: ignore[call-overload]
        "max_position_embeddings": int(value("gemma3.context_length")),  # type: ignore[call-overload]
        "rms_norm_eps": float(value("gemma3.attention.layer_norm_rms_epsilon")),  # type: ignore[arg-type]
        "rope_theta": float(value("gemma3.rope.freq_base")),  # type: ignore[arg-type]
        "rope_local_base_freq": 10_000.0,
        "layer_types": [
            "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layer)
        ],
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": True,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "pad_token_id": 0,
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "README.md").write_text(
        "---\nlicense: gemma\nbase_model: google/gemma-3-270m\n---\n"
        "Gemma 3 270M, dequantized from a Q4_K_M GGUF for round-trip tests.\n"
    )
    write_gemma_tokenizer(folder, bundled_gguf)
