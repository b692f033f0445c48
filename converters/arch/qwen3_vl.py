"""Qwen3-VL, dense and MoE: text model (``qwen3vl`` / ``qwen3vlmoe``) and vision projector
(mmproj, ``qwen3vl_merger``).

Reference: transformers ``models/qwen3_vl/modeling_qwen3_vl.py`` and
``models/qwen3_vl_moe/modeling_qwen3_vl_moe.py`` (the model); llama.cpp's
``convert_hf_to_gguf.py`` ``Qwen3VLTextModel`` / ``Qwen3VLMoeTextModel`` /
``Qwen3VLVisionModel``, ``src/models/qwen3vl*.cpp`` and ``tools/mtmd/models/qwen3vl.cpp``.

Stored names: ``model.language_model.*`` + ``lm_head.*`` (text) and ``model.visual.*``
(vision); older re-saves use ``language_model.model.*`` / ``visual.*``. They are
normalised to ``model.*`` / ``lm_head.*`` and ``visual.*``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import gguf
import numpy as np
from gguf import MODEL_TENSOR
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
from ggufserve.converters.errors import ConfigError, TensorMappingError
from ggufserve.converters.vocab import load_bpe_vocab, write_bpe_vocab
from ggufserve.converters.writer import PlannedTensor

TEXT_WHERE = "config.json text_config"
VISION_WHERE = "config.json vision_config"


def normalise(name: str) -> str:
    """Map the stored layouts onto ``model.*`` / ``lm_head.*`` (text) and ``visual.*``."""
    name = language_model_name(name)
    if name.startswith("model.visual."):
        return name[len("model.") :]
    return name


def text_config(ckpt: Checkpoint) -> dict[str, Any]:
    return require(ckpt.config, "text_config", dict, "config.json")


def vision_config(ckpt: Checkpoint) -> dict[str, Any]:
    return require(ckpt.config, "vision_config", dict, "config.json")


def deepstack_indexes(ckpt: Checkpoint) -> list[int]:
    """The ViT blocks whose features feed the language model's first layers (deepstack).

    Raises:
        ConfigError: not a list of distinct, increasing block indexes.
    """
    v = vision_config(ckpt)
    indexes = optional(v, "deepstack_visual_indexes", list, [], VISION_WHERE)
    depth = require(v, "depth", int, VISION_WHERE)
    valid = all(isinstance(i, int) and not isinstance(i, bool) for i in indexes)
    if not valid or indexes != sorted(set(indexes)) or any(not 0 <= i < depth for i in indexes):
        raise ConfigError(
            f"{VISION_WHERE}: deepstack_visual_indexes must be increasing block indexes "
            f"below depth {depth}"
        )
    return list(indexes)


def mrope(c: dict[str, Any]) -> tuple[float, list[int]]:
    """(rope base, M-RoPE sections [t, h, w]) from transformers 5's ``rope_parameters`` or
    the Hub's ``rope_theta`` + ``rope_scaling``.

    Raises:
        ConfigError: rope scaling other than the default, or non-interleaved M-RoPE (llama.cpp
            runs Qwen3-VL with interleaved M-RoPE, LLAMA_ROPE_TYPE_IMROPE), or sections
            that are not 3 non-negative ints.
    """
    params = optional(c, "rope_parameters", dict, None, TEXT_WHERE)
    if params is None:
        params = {
            **optional(c, "rope_scaling", dict, {}, TEXT_WHERE),
            "rope_theta": optional(c, "rope_theta", (int, float), 500_000.0, TEXT_WHERE),
        }
    where = f"{TEXT_WHERE} rope"
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "mrope"):
        raise ConfigError(f"{where}: rope_type '{kind}' is not supported (only default M-RoPE)")
    if params.get("mrope_interleaved", True) is not True:
        raise ConfigError(f"{where}: only interleaved M-RoPE (mrope_interleaved) is supported")
    sections = require(params, "mrope_section", list, where)
    if len(sections) != 3 or not all(isinstance(s, int) and s >= 0 for s in sections):
        raise ConfigError(f"{where}: mrope_section must be 3 non-negative ints, not {sections}")
    theta = require(params, "rope_theta", (int, float), where)
    return float(theta), list(sections)


class Qwen3VLText(DecoderConverter):
    """The language model of ``Qwen3VLForConditionalGeneration`` (2B–32B).

    Raises (on construction):
        ConfigError: a required key is missing or mistyped, or a value llama.cpp's qwen3vl
            graph does not compute (attention bias, a non-SiLU activation, non-default rope
            scaling, M-RoPE sections that do not cover head_dim / 2, an untied model without
            ``lm_head``).
        VocabError: see :func:`ggufserve.converters.vocab.load_bpe_vocab`.
    """

    gguf_arch = "qwen3vl"
    model_arch = gguf.MODEL_ARCH.QWEN3VL

    def __init__(self, ckpt: Checkpoint):
        super().__init__(ckpt)
        c = text_config(ckpt)
        # Defaults where config.json is silent: transformers' Qwen3VLTextConfig ones.
        self.read_decoder(c, TEXT_WHERE, head_dim=128, n_ctx_train=128_000)
        self.rope_theta, self.sections = mrope(c)
        if sum(self.sections) != self.head_dim // 2:
            raise ConfigError(
                f"{TEXT_WHERE}: mrope_section {self.sections} must sum to head_dim / 2 "
                f"({self.head_dim // 2})"
            )
        if optional(c, "attention_bias", bool, False, TEXT_WHERE):
            raise ConfigError(f"{TEXT_WHERE}: attention_bias is not supported by llama.cpp")
        if optional(c, "hidden_act", str, "silu", TEXT_WHERE) != "silu":
            raise ConfigError(f"{TEXT_WHERE}: hidden_act must be silu")
        self.n_deepstack = len(deepstack_indexes(ckpt)) if "vision_config" in ckpt.config else 0
        self.vocab, self.pre_tokenizer = load_bpe_vocab(ckpt, self.n_vocab_rows)
        # transformers 5 ties by the top-level flag (Qwen3VLForConditionalGeneration).
        tied = ckpt.config.get("tie_word_embeddings", c.get("tie_word_embeddings", False))
        self.tied = bool(tied)
        if not self.tied and not any(normalise(n) == "lm_head.weight" for n in ckpt.tensors):
            raise ConfigError("config.json: tie_word_embeddings is false but lm_head is missing")
        self.name_map = gguf.get_tensor_name_map(self.model_arch, self.n_layer)

    def claims(self, name: str) -> bool:
        return normalise(name).startswith(("model.", "lm_head."))

    def set_gguf_parameters(self, writer: gguf.GGUFWriter) -> None:
        self.write_decoder(writer)
        writer.add_rope_freq_base(self.rope_theta)
        # llama.cpp reads exactly 4 sections; the 4th (unused by text) is 0.
        writer.add_rope_dimension_sections([*self.sections, 0])
        writer.add_num_deepstack_layers(self.n_deepstack)
        write_bpe_vocab(writer, self.ckpt, self.vocab, self.pre_tokenizer)

    def plan_tensors(self) -> list[PlannedTensor]:
        plans: list[PlannedTensor] = []
        for ref in self.claimed():
            name = normalise(ref.name)
            if name == "lm_head.weight" and self.tied:
                continue  # tied to token_embd (llama.cpp reuses it when output.weight is absent)
            plans.extend(self._plan(ref, name))
        return plans

    def _plan(self, ref: TensorRef, name: str) -> list[PlannedTensor]:
        gguf_name = map_name(self.name_map, name, ref.name)
        kind = gguf_name.split(".")[-2]
        check_shape(ref, self.expected_shapes().get(kind, (self.n_embd,)))
        return [PlannedTensor(gguf_name, ref, ref.shape)]


def _rows(start: int, stop: int, transpose: bool) -> Callable[[np.ndarray], np.ndarray]:
    """Row-wise fix-up for stacked experts (axis 0 = expert): take ``[start:stop]`` of the
    stored per-expert matrix's output axis, transposing the Hub layout into GGML's."""

    def take(data: np.ndarray) -> np.ndarray:
        if transpose:  # Hub (E, n_in, n_out) → (E, n_out, n_in)
            return np.ascontiguousarray(data[:, :, start:stop].transpose(0, 2, 1))
        return data[:, start:stop, :]

    return take


def _frame(t: int) -> Callable[[np.ndarray], np.ndarray]:
    """Row-wise fix-up: temporal slice ``t`` of a Conv3D weight (out, in, T, p, p)."""

    def take(data: np.ndarray) -> np.ndarray:
        return data[:, :, t]

    return take


class Qwen3VLMoeText(Qwen3VLText):
    """The language model of ``Qwen3VLMoeForConditionalGeneration`` (30B-A3B, 235B-A22B).

    Experts are stored fused per layer. GGML wants ``ffn_{gate,up}_exps`` with ne
    ``[n_embd, n_ff_exp, n_expert]`` (numpy ``(E, n_ff_exp, n_embd)``) and ``ffn_down_exps``
    with ne ``[n_ff_exp, n_embd, n_expert]`` (numpy ``(E, n_embd, n_ff_exp)``). Hub
    checkpoints store ``gate_up_proj`` as PyTorch ``(E, n_embd, 2·n_ff_exp)`` (gate first
    along the last axis) and ``down_proj`` as ``(E, n_ff_exp, n_embd)``: each expert matrix
    is transposed. A checkpoint saved from transformers 5's in-memory model has
    ``(E, 2·n_ff_exp, n_embd)`` / ``(E, n_embd, n_ff_exp)``: already GGML's order. The
    layout is told apart once per checkpoint by the shape of ``gate_up_proj``.

    Raises (on construction), in addition to :class:`Qwen3VLText`:
        ConfigError: missing expert keys, top-k weights not normalised, dense layers mixed
            in (``decoder_sparse_step`` ≠ 1 or ``mlp_only_layers``), or an expert shape that
            could be either layout (n_embd == 2·n_ff_exp).
    """

    gguf_arch = "qwen3vlmoe"
    model_arch = gguf.MODEL_ARCH.QWEN3VLMOE

    def __init__(self, ckpt: Checkpoint):
        super().__init__(ckpt)
        c = text_config(ckpt)
        key = "num_experts" if "num_experts" in c else "num_local_experts"
        self.n_expert = require(c, key, int, TEXT_WHERE)
        self.n_expert_used = require(c, "num_experts_per_tok", int, TEXT_WHERE)
        self.n_ff_exp = require(c, "moe_intermediate_size", int, TEXT_WHERE)
        if not 0 < self.n_expert_used <= self.n_expert:
            raise ConfigError(f"{TEXT_WHERE}: num_experts_per_tok must be 1..{self.n_expert}")
        # llama.cpp's qwen3vlmoe graph always normalises the top-k weights and has no
        # dense layers (src/models/qwen3vlmoe.cpp).
        if optional(c, "norm_topk_prob", bool, True, TEXT_WHERE) is not True:
            raise ConfigError(f"{TEXT_WHERE}: norm_topk_prob false is not supported by llama.cpp")
        step = optional(c, "decoder_sparse_step", int, 1, TEXT_WHERE)
        if step != 1 or optional(c, "mlp_only_layers", list, [], TEXT_WHERE):
            raise ConfigError(
                f"{TEXT_WHERE}: every layer must be MoE (decoder_sparse_step 1, no mlp_only_layers)"
            )
        if self.n_embd == 2 * self.n_ff_exp:
            raise ConfigError(
                f"{TEXT_WHERE}: hidden_size = 2 × moe_intermediate_size: the stored expert "
                "layout (Hub or transformers in-memory) cannot be told apart"
            )
        # One layout per checkpoint, told by gate_up_proj (down_proj alone is ambiguous
        # when n_embd == n_ff); every expert tensor is then checked against it.
        hub_shape = (self.n_expert, self.n_embd, 2 * self.n_ff_exp)
        self.hub_layout = any(
            ref.shape == hub_shape
            for name, ref in ckpt.tensors.items()
            if name.endswith("mlp.experts.gate_up_proj")
        )

    def set_gguf_parameters(self, writer: gguf.GGUFWriter) -> None:
        super().set_gguf_parameters(writer)
        writer.add_expert_count(self.n_expert)
        writer.add_expert_used_count(self.n_expert_used)
        writer.add_expert_feed_forward_length(self.n_ff_exp)

    def _plan(self, ref: TensorRef, name: str) -> list[PlannedTensor]:
        e, n, f = self.n_expert, self.n_embd, self.n_ff_exp
        if name.endswith("mlp.experts.gate_up_proj"):
            bid = int(name.split(".")[2])
            hub = self.hub_layout
            check_shape(ref, (e, n, 2 * f) if hub else (e, 2 * f, n))
            gate = gguf.TENSOR_NAMES[MODEL_TENSOR.FFN_GATE_EXP].format(bid=bid) + ".weight"
            up = gguf.TENSOR_NAMES[MODEL_TENSOR.FFN_UP_EXP].format(bid=bid) + ".weight"
            return [
                PlannedTensor(gate, ref, (e, f, n), _rows(0, f, hub)),
                PlannedTensor(up, ref, (e, f, n), _rows(f, 2 * f, hub)),
            ]
        if name.endswith("mlp.experts.down_proj"):
            hub = self.hub_layout
            check_shape(ref, (e, f, n) if hub else (e, n, f))
            gguf_name = map_name(self.name_map, name, ref.name) + ".weight"
            return [PlannedTensor(gguf_name, ref, (e, n, f), _rows(0, n, hub))]
        if name.endswith("mlp.gate.weight"):
            check_shape(ref, (e, n))
            gguf_name = map_name(self.name_map, name, ref.name)
            # The router stays F32, as llama.cpp's converter keeps ffn_gate_inp.
            return [PlannedTensor(gguf_name, ref, ref.shape, force_type=QT.F32)]
        return super()._plan(ref, name)


class Qwen3VLVision(Converter):
    """The ViT, merger and deepstack mergers of Qwen3-VL (dense and MoE) → mmproj.

    Raises (on construction):
        ConfigError: ``vision_config`` or a required key is missing, ``temporal_patch_size``
            is not 2 (llama.cpp splits the Conv3D into two Conv2D), the position table is
            not a square grid, the activation is not tanh-GELU, or the merger's output
            width differs from the text model's hidden size.
    """

    gguf_arch = "clip"

    def __init__(self, ckpt: Checkpoint):
        super().__init__(ckpt)
        v = vision_config(ckpt)
        self.n_embd = require(v, "hidden_size", int, VISION_WHERE)
        self.n_ff = require(v, "intermediate_size", int, VISION_WHERE)
        self.n_layer = require(v, "depth", int, VISION_WHERE)
        self.n_head = require(v, "num_heads", int, VISION_WHERE)
        self.patch_size = require(v, "patch_size", int, VISION_WHERE)
        self.merge = optional(v, "spatial_merge_size", int, 2, VISION_WHERE)
        self.channels = optional(v, "in_channels", int, 3, VISION_WHERE)
        self.n_pos = require(v, "num_position_embeddings", int, VISION_WHERE)
        self.out_hidden = require(v, "out_hidden_size", int, VISION_WHERE)
        self.deepstack = deepstack_indexes(ckpt)
        if optional(v, "temporal_patch_size", int, 2, VISION_WHERE) != 2:
            raise ConfigError(f"{VISION_WHERE}: temporal_patch_size must be 2 for llama.cpp")
        if math.isqrt(self.n_pos) ** 2 != self.n_pos:
            raise ConfigError(f"{VISION_WHERE}: num_position_embeddings must be a square")
        if optional(v, "hidden_act", str, "gelu_pytorch_tanh", VISION_WHERE) != (
            "gelu_pytorch_tanh"
        ):
            raise ConfigError(f"{VISION_WHERE}: hidden_act must be gelu_pytorch_tanh")
        n_embd_text = require(text_config(ckpt), "hidden_size", int, TEXT_WHERE)
        if self.out_hidden != n_embd_text:
            raise ConfigError(
                f"{VISION_WHERE}: out_hidden_size {self.out_hidden} must equal the text "
                f"hidden_size {n_embd_text}"
            )
        # transformers' ViT LayerNorms use eps 1e-6 (Qwen3VLVisionBlock); llama.cpp's
        # Qwen3VLVisionModel writes the text rms_norm_eps, which is 1e-6 in every released
        # Qwen3-VL: written the same way, so the two converters' mmproj files agree.
        eps = optional(text_config(ckpt), "rms_norm_eps", (int, float), 1e-6, TEXT_WHERE)
        self.eps = float(eps)
        # Qwen's defaults (mean/std 0.5) where no image processor file says. The pixel
        # limits there are not written: clip.cpp fixes Qwen3-VL's (8 to 4096 image tokens).
        self.preprocessor = next(iter(ckpt.image_processor_configs()), {})
        self.name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, self.n_layer)

    def claims(self, name: str) -> bool:
        return normalise(name).startswith("visual.")

    def set_gguf_parameters(self, writer: gguf.GGUFWriter) -> None:
        writer.add_clip_has_vision_encoder(True)
        writer.add_clip_projector_type(gguf.VisionProjectorType.QWEN3VL)
        writer.add_vision_projection_dim(self.out_hidden)
        # clip.cpp derives the position grid from image_size / patch_size.
        writer.add_vision_image_size(math.isqrt(self.n_pos) * self.patch_size)
        writer.add_vision_patch_size(self.patch_size)
        writer.add_vision_embedding_length(self.n_embd)
        writer.add_vision_feed_forward_length(self.n_ff)
        writer.add_vision_block_count(self.n_layer)
        writer.add_vision_head_count(self.n_head)
        writer.add_vision_attention_layernorm_eps(self.eps)
        writer.add_vision_image_mean(self._stat("image_mean"))
        writer.add_vision_image_std(self._stat("image_std"))
        writer.add_vision_use_gelu(True)
        writer.add_vision_spatial_merge_size(self.merge)
        writer.add_vision_is_deepstack_layers([i in self.deepstack for i in range(self.n_layer)])

    def _stat(self, key: str) -> list[float]:
        values = self.preprocessor.get(key, [0.5, 0.5, 0.5])
        if not isinstance(values, list) or len(values) != self.channels:
            raise ConfigError(f"preprocessor config: {key} must list {self.channels} numbers")
        return [float(x) for x in values]

    def plan_tensors(self) -> list[PlannedTensor]:
        plans: list[PlannedTensor] = []
        for ref in self.claimed():
            plans.extend(self._plan(ref, normalise(ref.name)))
        return plans

    def _gguf_name(self, name: str, stored: str) -> str:
        merger = {
            "visual.merger.norm": gguf.TENSOR_NAMES[MODEL_TENSOR.V_POST_NORM],
            "visual.merger.linear_fc1": gguf.TENSOR_NAMES[MODEL_TENSOR.V_MMPROJ].format(bid=0),
            "visual.merger.linear_fc2": gguf.TENSOR_NAMES[MODEL_TENSOR.V_MMPROJ].format(bid=2),
        }
        stem, _, suffix = name.rpartition(".")
        if stem in merger:
            return f"{merger[stem]}.{suffix}"
        if name.startswith("visual.deepstack_merger_list."):
            # llama.cpp names deepstack mergers by the ViT block they read, not list order.
            parts = name.split(".")
            k = int(parts[2])
            if not 0 <= k < len(self.deepstack):
                raise TensorMappingError(f"tensor '{stored}' has no deepstack layer {k}")
            parts[2] = str(self.deepstack[k])
            return map_name(self.name_map, "model." + ".".join(parts), stored)
        return map_name(self.name_map, name, stored)

    def _plan(self, ref: TensorRef, name: str) -> list[PlannedTensor]:
        e, p, c = self.n_embd, self.patch_size, self.channels
        merged = e * self.merge**2
        gguf_name = self._gguf_name(name, ref.name)
        if gguf_name == "v.patch_embd.weight":
            # Conv3D over 2 frames = the sum of two Conv2D, one per temporal slice
            # (llama.cpp Qwen3VLVisionModel); F16 or F32: clip's conv path needs a float.
            check_shape(ref, (e, c, 2, p, p))
            return [
                PlannedTensor(out, ref, (e, c, p, p), _frame(t), float_only=True)
                for out, t in (("v.patch_embd.weight", 0), ("v.patch_embd.weight.1", 1))
            ]
        stem = gguf_name.rsplit(".", 1)[0]
        kind = stem.split(".")[-1]
        weights = {
            "v.position_embd": (self.n_pos, e),
            "attn_qkv": (3 * e, e),
            "attn_out": (e, e),
            "ffn_up": (self.n_ff, e),
            "ffn_down": (e, self.n_ff),
            "mm.0": (merged, merged),
            "mm.2": (self.out_hidden, merged),
            "fc1": (merged, merged),
            "fc2": (self.out_hidden, merged),
        }
        key = stem if stem in weights else kind
        if gguf_name.endswith(".bias") or key not in weights:
            width = {"attn_qkv": 3 * e, "ffn_up": self.n_ff, "mm.2": self.out_hidden}
            if stem.startswith(("v.deepstack.", "mm.")):
                width |= {"norm": merged, "fc1": merged, "fc2": self.out_hidden, "mm.0": merged}
            check_shape(ref, (width.get(key, e),))
            return [PlannedTensor(gguf_name, ref, ref.shape)]
        check_shape(ref, weights[key])
        if stem == "v.position_embd":
            return [PlannedTensor(gguf_name, ref, ref.shape, force_type=QT.F32)]
        return [PlannedTensor(gguf_name, ref, ref.shape)]
