"""Converter hooks shared by every architecture (DESIGN.md §4).

A converter claims the checkpoint tensors it understands, plans each one's GGUF name,
shape and fix-up (``plan_tensors``), and writes its hparams (``set_gguf_parameters``).
The caller fails on any tensor that no converter claimed: silently dropping a weight is
the worst bug a converter can have.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import gguf

from converters.checkpoint import Checkpoint, TensorRef
from converters.errors import ConfigError, TensorMappingError
from converters.writer import PlannedTensor


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
