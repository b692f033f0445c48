"""Gemma 3: text model (``gemma3``) and SigLIP vision projector (mmproj, ``gemma3``).

Reference: transformers ``models/gemma3/modeling_gemma3.py`` (the model) and llama.cpp's
``convert_hf_to_gguf.py`` ``Gemma3Model`` / ``Gemma3VisionModel``, ``src/llama-model.cpp``
(``LLM_ARCH_GEMMA3``) and ``tools/mtmd/clip.cpp`` (``PROJECTOR_TYPE_GEMMA3``).

Stored tensor names come in several layouts (transformers 4.x/5.x, Hub re-saves); they
are normalised first to ``model.*`` / ``lm_head`` (text), ``vision_tower.vision_model.*``
and ``multi_modal_projector.*``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from ggufserve.converters.arch.base import (
    Converter,
    DecoderConverter,
    check_shape,
    language_model_name,
    map_name,
    optional,
    require,
)
from ggufserve.converters.checkpoint import Checkpoint, TensorRef
from ggufserve.converters.errors import ConfigError
from ggufserve.converters.vocab import load_sentencepiece_vocab, write_vocab
from ggufserve.converters.writer import PlannedTensor

# llama.cpp hard-codes these for gemma3 (src/llama-model.cpp: set_swa_pattern(6),
# rope_freq_base_train_swa = 10000): a config that differs would run differently.
SWA_PATTERN = 6
SWA_ROPE_BASE = 10_000.0
# llama.cpp scales attention by 1/sqrt(n_embd/n_head) for its 27B type (62 layers).
LAYERS_27B = 62
# transformers' Gemma3TextConfig defaults, which both transformers and llama.cpp's converter
# (through AutoConfig) use where config.json is silent: google/gemma-3-4b-it's text_config
# names only the sizes, rope_scaling and sliding_window. The sizes themselves
# (hidden_size, intermediate_size, num_hidden_layers) stay required.
TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
}
# clip.cpp's Gemma 3 pooling when the mmproj names none: 4×4 patches per image token
# (tools/mtmd/clip.cpp PROJECTOR_TYPE_GEMMA3; every released Gemma 3 uses it).
DEFAULT_SCALE_FACTOR = 4


def normalise(name: str) -> str:
    """Map the stored layouts onto one: ``model.*``/``lm_head``, ``vision_tower.vision_model.*``,
    ``multi_modal_projector.*``."""
    text = language_model_name(name)
    if text != name:
        return text
    if name.startswith("model.") and name.split(".")[1] in (
        "vision_tower",
        "multi_modal_projector",
    ):
        name = name[len("model.") :]
    if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + name[len("vision_tower.") :]
    return name


def plus_one(data: np.ndarray) -> np.ndarray:
    # Gemma's RMSNorm computes x * (1 + w) (modeling_gemma3.py Gemma3RMSNorm); llama.cpp x * w.
    return data + 1.0


def plus_one_in_f16(data: np.ndarray) -> np.ndarray:
    # As plus_one, for a float16 checkpoint: llama.cpp's converter adds in the stored
    # float16 (torch), so 1 + w is rounded to float16; done alike for identical tensors.
    return (data.astype(np.float16) + np.float16(1.0)).astype(np.float32)


def norm_shift(ref: TensorRef) -> Callable[[np.ndarray], np.ndarray]:
    """The ``+1`` fix-up for a Gemma RMSNorm weight stored as ``ref``."""
    return plus_one_in_f16 if ref.dtype == "F16" else plus_one


def text_config(ckpt: Checkpoint) -> dict[str, Any]:
    """The text hparams: ``text_config`` for the multimodal model, the root otherwise, over
    transformers' defaults for the keys Hub configs leave out (:data:`TEXT_DEFAULTS`)."""
    config = ckpt.config
    if "text_config" in config:
        config = require(config, "text_config", dict, "config.json")
    return {**TEXT_DEFAULTS, **config}


def _rope(c: dict[str, Any], where: str) -> tuple[float, float, dict[str, Any] | None]:
    """(global rope base, local rope base, linear scaling or None) from either layout:
    transformers 5's ``rope_parameters`` per attention type, or the Hub's ``rope_theta`` /
    ``rope_local_base_freq`` / ``rope_scaling``."""
    params = optional(c, "rope_parameters", dict, None, where)
    if params is None:
        scaling = optional(c, "rope_scaling", dict, None, where)
        return (
            optional(c, "rope_theta", (int, float), 1_000_000.0, where),
            optional(c, "rope_local_base_freq", (int, float), SWA_ROPE_BASE, where),
            scaling,
        )
    full = params.get("full_attention", params)
    local = params.get("sliding_attention", {})
    scaling = full if full.get("rope_type", "default") != "default" else None
    return (
        optional(full, "rope_theta", (int, float), 1_000_000.0, f"{where} rope_parameters"),
        optional(local, "rope_theta", (int, float), SWA_ROPE_BASE, f"{where} rope_parameters"),
        scaling,
    )


class Gemma3Text(DecoderConverter):
    """``Gemma3ForCausalLM`` (270M, 1B) or the language model of ``Gemma3ForConditionalGeneration``.

    Raises (on construction):
        ConfigError: a required key is missing or has a wrong type, or a value llama.cpp's
            gemma3 graph cannot reproduce (attention logit softcapping, a sliding-window
            pattern other than 5 local : 1 global, a local rope base other than 10000, a
            ``query_pre_attn_scalar`` llama.cpp does not use).
        VocabError: see :func:`ggufserve.converters.vocab.load_sentencepiece_vocab`.
    """

    gguf_arch = "gemma3"

    def __init__(self, ckpt: Checkpoint):
        super().__init__(ckpt)
        where = "config.json text_config" if "text_config" in ckpt.config else "config.json"
        c = text_config(ckpt)
        self.read_decoder(c, where, head_dim=256, n_ctx_train=131_072)
        self.sliding_window = require(c, "sliding_window", int, where)
        self.rope_theta, local_base, self.rope_scaling = _rope(c, where)
        if float(local_base) != SWA_ROPE_BASE:
            raise ConfigError(
                f"{where}: the local rope base must be {SWA_ROPE_BASE:g} for llama.cpp"
            )
        self.final_softcap = optional(c, "final_logit_softcapping", (int, float), None, where)
        self._check_graph_compatible(c, where)
        # One token per embedding row (vocab_size, e.g. 262,208 = 262,144 pieces +
        # <image_soft_token> + [PAD] tokens), as llama.cpp's Gemma3Model writes them.
        self.vocab = load_sentencepiece_vocab(ckpt, self.n_vocab_rows)
        # llama.cpp's Gemma3Model writes add_space_prefix false whatever tokenizer.model says.
        self.vocab.add_space_prefix = False
        self.tied = bool(c.get("tie_word_embeddings", ckpt.config.get("tie_word_embeddings", True)))
        self.name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, self.n_layer)

    def _check_graph_compatible(self, c: dict[str, Any], where: str) -> None:
        if c.get("attn_logit_softcapping") is not None:
            raise ConfigError(
                f"{where}: attn_logit_softcapping is not supported by llama.cpp's gemma3"
            )
        pattern = c.get("sliding_window_pattern", c.get("_sliding_window_pattern", SWA_PATTERN))
        layer_types = optional(c, "layer_types", list, None, where)
        expected = [
            "full_attention" if (i + 1) % SWA_PATTERN == 0 else "sliding_attention"
            for i in range(self.n_layer)
        ]
        if pattern != SWA_PATTERN or (layer_types is not None and layer_types != expected):
            raise ConfigError(
                f"{where}: llama.cpp's gemma3 needs {SWA_PATTERN - 1} sliding-window layers "
                "then 1 global layer, repeated"
            )
        scalar = optional(c, "query_pre_attn_scalar", (int, float), self.head_dim, where)
        allowed = {float(self.head_dim)}
        if self.n_layer == LAYERS_27B:
            allowed.add(self.n_embd / self.n_head)
        if float(scalar) not in allowed:
            raise ConfigError(
                f"{where}: query_pre_attn_scalar {scalar} is not what llama.cpp uses "
                f"({sorted(allowed)})"
            )

    def claims(self, name: str) -> bool:
        return normalise(name).startswith(("model.", "lm_head."))

    def set_gguf_parameters(self, writer: gguf.GGUFWriter) -> None:
        self.write_decoder(writer)
        writer.add_rope_freq_base(float(self.rope_theta))
        writer.add_rope_freq_base_swa(SWA_ROPE_BASE)
        writer.add_sliding_window(self.sliding_window)
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind != "linear" or not isinstance(self.rope_scaling.get("factor"), (int, float)):
                raise ConfigError(f"rope_scaling {self.rope_scaling} is not linear with a factor")
            # Global layers only; llama.cpp keeps the local layers unscaled.
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(self.rope_scaling["factor"]))
        if self.final_softcap:  # 0 means none
            writer.add_final_logit_softcapping(float(self.final_softcap))
        write_vocab(writer, self.ckpt, self.vocab)

    def plan_tensors(self) -> list[PlannedTensor]:
        plans = []
        for ref in self.claimed():
            name = normalise(ref.name)
            if name == "lm_head.weight" and self.tied:
                continue  # tied to token_embd (llama.cpp reuses it when output.weight is absent)
            gguf_name = map_name(self.name_map, name, ref.name)
            plans.append(self._plan(ref, name, gguf_name))
        return plans

    def _plan(self, ref: TensorRef, name: str, gguf_name: str) -> PlannedTensor:
        kind = gguf_name.split(".")[-2]
        # token_embd/output keep all vocab_size rows: the vocabulary has a token per row.
        check_shape(ref, self.expected_shapes().get(kind, (self.n_embd,)))
        if name.endswith("norm.weight"):
            return PlannedTensor(gguf_name, ref, ref.shape, norm_shift(ref), force_type=QT.F32)
        return PlannedTensor(gguf_name, ref, ref.shape)


class Gemma3Vision(Converter):
    """The SigLIP tower + multi-modal projector of ``Gemma3ForConditionalGeneration`` → mmproj.

    Raises (on construction):
        ConfigError: ``vision_config`` or a required key is missing, or the image size is
            not a multiple of the patch size.
    """

    gguf_arch = "clip"

    def __init__(self, ckpt: Checkpoint):
        super().__init__(ckpt)
        where = "config.json vision_config"
        v = require(ckpt.config, "vision_config", dict, "config.json")
        self.n_embd = require(v, "hidden_size", int, where)
        self.n_ff = require(v, "intermediate_size", int, where)
        self.n_layer = require(v, "num_hidden_layers", int, where)
        self.n_head = require(v, "num_attention_heads", int, where)
        self.image_size = require(v, "image_size", int, where)
        self.patch_size = require(v, "patch_size", int, where)
        self.eps = optional(v, "layer_norm_eps", (int, float), 1e-6, where)
        self.channels = optional(v, "num_channels", int, 3, where)
        self.n_embd_text = require(text_config(ckpt), "hidden_size", int, "config.json text_config")
        tokens = optional(ckpt.config, "mm_tokens_per_image", int, 256, "config.json")
        side = self.image_size // self.patch_size
        merge = side // math.isqrt(tokens)
        if self.image_size % self.patch_size or merge * math.isqrt(tokens) != side:
            raise ConfigError(
                f"{where}: image_size {self.image_size}, patch_size {self.patch_size} and "
                f"mm_tokens_per_image {tokens} do not tile"
            )
        self.scale_factor = merge
        self.n_patches = side * side
        self.name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, self.n_layer)
        self.image_mean, self.image_std = self._normalisation()

    def _normalisation(self) -> tuple[list[float], list[float]]:
        """Image mean/std from ``preprocessor_config.json`` (Hub) or ``processor_config.json``
        (transformers 5, under ``image_processor``); SigLIP's 0.5 when neither says."""
        for data in self.ckpt.image_processor_configs():
            if "image_mean" in data and "image_std" in data:
                return [float(x) for x in data["image_mean"]], [float(x) for x in data["image_std"]]
        return [0.5] * 3, [0.5] * 3

    def claims(self, name: str) -> bool:
        return normalise(name).startswith(("vision_tower.", "multi_modal_projector."))

    def set_gguf_parameters(self, writer: gguf.GGUFWriter) -> None:
        writer.add_clip_has_vision_encoder(True)
        writer.add_clip_projector_type(gguf.VisionProjectorType.GEMMA3)
        writer.add_vision_projection_dim(self.n_embd_text)
        writer.add_vision_image_size(self.image_size)
        writer.add_vision_patch_size(self.patch_size)
        writer.add_vision_embedding_length(self.n_embd)
        writer.add_vision_feed_forward_length(self.n_ff)
        writer.add_vision_block_count(self.n_layer)
        writer.add_vision_head_count(self.n_head)
        writer.add_vision_attention_layernorm_eps(float(self.eps))
        writer.add_vision_image_mean(self.image_mean)
        writer.add_vision_image_std(self.image_std)
        writer.add_vision_use_gelu(True)
        if self.scale_factor != DEFAULT_SCALE_FACTOR:  # as llama.cpp's Gemma3VisionModel
            writer.add_vision_projector_scale_factor(self.scale_factor)

    def plan_tensors(self) -> list[PlannedTensor]:
        plans = []
        for ref in self.claimed():
            name = normalise(ref.name).replace(
                "mm_input_projection_weight", "mm_input_projection.weight"
            )
            if name.startswith("vision_tower.vision_model.head."):
                continue  # SigLIP's pooling head: unused by Gemma 3 (modeling_gemma3.py)
            plans.append(self._plan(ref, map_name(self.name_map, name, ref.name)))
        return plans

    def _plan(self, ref: TensorRef, gguf_name: str) -> PlannedTensor:
        e, p = self.n_embd, self.patch_size
        expected = {
            "v.patch_embd.weight": (e, self.channels, p, p),
            "v.position_embd.weight": (self.n_patches, e),
            # HF (n_embd_vision, n_embd_text) = GGML ne [n_embd_text, n_embd_vision], which
            # clip.cpp transposes itself: no transpose here (Gemma3VisionModel).
            "mm.input_projection.weight": (e, self.n_embd_text),
        }
        kind = gguf_name.split(".")[-2] if gguf_name.startswith("v.blk.") else gguf_name
        per_block = {
            "attn_q": (e, e),
            "attn_k": (e, e),
            "attn_v": (e, e),
            "attn_out": (e, e),
            "ffn_up": (self.n_ff, e),
            "ffn_down": (e, self.n_ff),
        }
        if (
            gguf_name.endswith(".bias")
            or kind in ("ln1", "ln2")
            or gguf_name.startswith("v.post_ln")
        ):
            shape = (self.n_ff,) if gguf_name.endswith("ffn_up.bias") else (e,)
        else:
            shape = expected.get(gguf_name) or per_block.get(kind) or (e,)
        check_shape(ref, shape)
        if gguf_name == "mm.soft_emb_norm.weight":
            return PlannedTensor(gguf_name, ref, ref.shape, norm_shift(ref), force_type=QT.F32)
        if gguf_name == "mm.input_projection.weight":
            return PlannedTensor(gguf_name, ref, ref.shape, force_type=QT.F16)
        if gguf_name.startswith(("v.patch_embd", "v.position_embd")):
            return PlannedTensor(gguf_name, ref, ref.shape, force_type=QT.F32)
        return PlannedTensor(gguf_name, ref, ref.shape)
