"""Every stored layout of Gemma 3 tensor names maps to the same GGUF names."""

from __future__ import annotations

import gguf
import pytest

from ggufserve.converters.arch.gemma3 import normalise

LAYOUTS = {
    # Hub checkpoints (transformers 4.x)
    "language_model.model.layers.3.self_attn.q_proj.weight": "blk.3.attn_q.weight",
    "vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight": "v.blk.1.ffn_up.weight",
    "multi_modal_projector.mm_soft_emb_norm.weight": "mm.soft_emb_norm.weight",
    # transformers 5.x saves
    "vision_tower.encoder.layers.1.mlp.fc1.weight": "v.blk.1.ffn_up.weight",
    "vision_tower.post_layernorm.bias": "v.post_ln.bias",
    # re-saved fine-tunes
    "model.language_model.layers.3.self_attn.q_proj.weight": "blk.3.attn_q.weight",
    "model.vision_tower.vision_model.embeddings.patch_embedding.weight": "v.patch_embd.weight",
    "model.multi_modal_projector.mm_soft_emb_norm.weight": "mm.soft_emb_norm.weight",
    "language_model.lm_head.weight": "output.weight",
    # text-only models
    "model.layers.0.pre_feedforward_layernorm.weight": "blk.0.ffn_norm.weight",
    "model.embed_tokens.weight": "token_embd.weight",
}


@pytest.mark.parametrize(("stored", "expected"), LAYOUTS.items())
def test_layouts_map_to_one_gguf_name(stored: str, expected: str) -> None:
    name = normalise(stored)
    arch = (
        gguf.MODEL_ARCH.MMPROJ
        if name.startswith(("vision_tower.", "multi_modal"))
        else gguf.MODEL_ARCH.GEMMA3
    )
    mapped = gguf.get_tensor_name_map(arch, 8).get_name(name, try_suffixes=(".weight", ".bias"))
    assert mapped == expected
