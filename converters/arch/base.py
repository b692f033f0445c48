"""Converter hooks shared by every architecture (docs/ARCHITECTURE.md, "Conventions").

A converter claims the checkpoint tensors it understands, plans each one's GGUF name,
shape and fix-up (``plan_tensors``), and writes its hparams (``set_gguf_parameters``).
The caller fails on any tensor that no converter claimed: silently dropping a weight is
the worst bug a converter can have.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import gguf

from ggufserve.converters.checkpoint import Checkpoint, TensorRef
from ggufserve.converters.errors import ConfigError, TensorMappingError
from ggufserve.converters.writer import PlannedTensor


def require(config: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``config[key]``, checked for type (bool is never accepted as a number).

    Raises:
        ConfigError: naming ``where`` and ``key`` when missing or of the wrong type.
    """
    if key not in config:
        raise ConfigError(f"{where}: missing required key '{key}'")
    value = config[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        names = "/".join(k.__name__ for k in kinds)
        raise ConfigError(f"{where}: key '{key}' must be {names}, not {type(value).__name__}")
    return value


def optional(
    config: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any, where: str
) -> Any:
    """Like :func:`require`, but ``default`` when the key is absent or null."""
    if config.get(key) is None:
        return default
    return require(config, key, kind, where)


class Converter(ABC):
    """One GGUF output (a text model or an mmproj) made from part of a checkpoint.

    Args:
        ckpt: The validated checkpoint.
    """

    gguf_arch: str

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt

    @abstractmethod
    def claims(self, name: str) -> bool:
        """Whether this converter is responsible for the stored tensor ``name``."""

    @abstractmethod
    def set_gguf_parameters(self, writer: gguf.GGUFWriter) -> None:
        """Write hparams, vocabulary and general.* metadata."""

    @abstractmethod
    def plan_tensors(self) -> list[PlannedTensor]:
        """Every output tensor, checked against the config before anything is written.

        Raises:
            TensorMappingError: a claimed tensor has no GGUF name, or a wrong shape.
        """

    def claimed(self) -> list[TensorRef]:
        return [ref for name, ref in sorted(self.ckpt.tensors.items()) if self.claims(name)]


class DecoderConverter(Converter):
    """A decoder-only language model: the hparams every llama.cpp text architecture reads.

    Attributes (after :meth:`read_decoder`): ``n_embd``, ``n_layer``, ``n_ff``, ``n_head``,
    ``n_head_kv``, ``head_dim``, ``n_ctx_train`` (tokens), ``rms_eps``, ``n_vocab_rows``
    (embedding rows, ``vocab_size``).
    """

    def read_decoder(
        self, c: dict[str, Any], where: str, *, head_dim: int | None, n_ctx_train: int
    ) -> None:
        """Read the HF keys; ``head_dim`` None defaults to hidden_size / heads.

        Raises:
            ConfigError: a required key is missing or mistyped.
        """
        self.n_embd: int = require(c, "hidden_size", int, where)
        self.n_layer: int = require(c, "num_hidden_layers", int, where)
        self.n_ff: int = require(c, "intermediate_size", int, where)
        self.n_head: int = require(c, "num_attention_heads", int, where)
        self.n_head_kv: int = optional(c, "num_key_value_heads", int, self.n_head, where)
        default_head_dim = head_dim if head_dim is not None else self.n_embd // self.n_head
        self.head_dim: int = optional(c, "head_dim", int, default_head_dim, where)
        self.n_ctx_train: int = optional(c, "max_position_embeddings", int, n_ctx_train, where)
        self.rms_eps: float = float(optional(c, "rms_norm_eps", (int, float), 1e-6, where))
        self.n_vocab_rows: int = require(c, "vocab_size", int, where)

    def write_decoder(self, writer: gguf.GGUFWriter) -> None:
        writer.add_context_length(self.n_ctx_train)
        writer.add_embedding_length(self.n_embd)
        writer.add_block_count(self.n_layer)
        writer.add_feed_forward_length(self.n_ff)
        writer.add_head_count(self.n_head)
        writer.add_head_count_kv(self.n_head_kv)
        writer.add_key_length(self.head_dim)
        writer.add_value_length(self.head_dim)
        writer.add_layer_norm_rms_eps(self.rms_eps)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """PyTorch shape of each GGUF tensor kind (``blk.N.<kind>.weight``) the config implies."""
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_head_kv * self.head_dim
        return {
            "token_embd": (self.n_vocab_rows, self.n_embd),
            "output": (self.n_vocab_rows, self.n_embd),
            "attn_q": (q_dim, self.n_embd),
            "attn_k": (kv_dim, self.n_embd),
            "attn_v": (kv_dim, self.n_embd),
            "attn_output": (self.n_embd, q_dim),
            "attn_q_norm": (self.head_dim,),
            "attn_k_norm": (self.head_dim,),
            "ffn_gate": (self.n_ff, self.n_embd),
            "ffn_up": (self.n_ff, self.n_embd),
            "ffn_down": (self.n_embd, self.n_ff),
        }


def language_model_name(name: str) -> str:
    """Text tensors of a multimodal checkpoint under one prefix: ``model.language_model.*``
    (transformers 5) and ``language_model.model.*`` (4.x) become ``model.*``,
    ``language_model.lm_head.*`` becomes ``lm_head.*``; other names are returned as is."""
    for prefix in ("model.language_model.", "language_model.model."):
        if name.startswith(prefix):
            return "model." + name[len(prefix) :]
    if name.startswith("language_model.lm_head."):
        return name[len("language_model.") :]
    return name


def map_name(name_map: gguf.TensorNameMap, name: str, stored: str) -> str:
    """GGUF name for a (prefix-normalised) HF tensor name.

    Raises:
        TensorMappingError: naming the stored tensor when gguf-py has no mapping for it.
    """
    mapped = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise TensorMappingError(f"no GGUF name for tensor '{stored}'")
    return mapped


def check_shape(ref: TensorRef, expected: tuple[int, ...]) -> None:
    """Raises: TensorMappingError when ``ref``'s stored shape is not ``expected``."""
    if ref.shape != expected:
        raise TensorMappingError(
            f"tensor '{ref.name}' has shape {list(ref.shape)}; the config implies {list(expected)}"
        )
