"""Loading a llama.cpp model and creating a context on it, with llama-cpp-python's
exceptions turned into :class:`~ggufserve.engine.base.ModelLoadError`."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
from llama_cpp import _internals

from ggufserve.engine.base import ModelLoadError

# What llama-cpp-python raises when llama.cpp returns no model or context.
LOAD_ERRORS = (ValueError, RuntimeError, OSError)


def load_model(
    path: Path, params: llama_cpp.llama_model_params, failure: str
) -> _internals.LlamaModel:
    """The model at ``path``.

    Raises:
        ModelLoadError: ``failure``, when llama.cpp cannot load the file.
    """
    try:
        return _internals.LlamaModel(path_model=str(path), params=params, verbose=False)
    except LOAD_ERRORS:
        raise ModelLoadError(failure) from None


def new_context(
    model: _internals.LlamaModel, params: llama_cpp.llama_context_params, failure: str
) -> _internals.LlamaContext:
    """A context on ``model``; on failure the model is closed too (nothing left to free).

    Raises:
        ModelLoadError: ``failure``, when llama.cpp cannot create the context (e.g. its KV
            cache does not fit in memory).
    """
    try:
        return _internals.LlamaContext(model=model, params=params, verbose=False)
    except LOAD_ERRORS:
        model.close()
        raise ModelLoadError(failure) from None
