"""Errors of the converter, one class per area; the CLI prints ``message`` and exits 2."""

from __future__ import annotations


class ConversionError(Exception):
    """Base class: a conversion could not be done; nothing was written."""


class CheckpointError(ConversionError):
    """The checkpoint folder is incomplete, unsafe or malformed (files, index, shards)."""


class SafetensorsError(CheckpointError):
    """A safetensors shard's header or data layout is invalid."""


class ConfigError(ConversionError):
    """``config.json`` lacks a required key, has a wrong type, or a value we cannot convert."""


class UnsupportedArchitectureError(ConversionError):
    """``config.json`` names an architecture this converter does not handle."""


class TensorMappingError(ConversionError):
    """A tensor has no GGUF name, or its shape is not what the config implies."""


class VocabError(ConversionError):
    """No usable tokenizer files, or they disagree with the config."""


class OutputExistsError(ConversionError):
    """An output file exists (or is a symlink) and ``--force`` was not given."""


class QuantizationError(ConversionError):
    """llama.cpp's quantizer failed or the type is unknown."""
