"""ggufserve: Gemma 3 / Qwen3-VL GGUF models behind an OpenAI-compatible server, or
in-process (docs/python.md)::

    import ggufserve

    with ggufserve.load("google/gemma-3-270m-it") as model:
        print(model.chat("Hello!").choices[0].message.content)

The names below are imported on first use: ``import ggufserve`` stays cheap for the
server and the command line.
"""

from __future__ import annotations

import importlib

# Not typing.TYPE_CHECKING: importing typing costs more than the rest of this module.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ggufserve import store
    from ggufserve.api.wire import (
        ChatCompletion,
        ChatCompletionChunk,
        Completion,
    )
    from ggufserve.errors import (
        APIError,
        ContextLengthExceededError,
        InternalServerError,
        InvalidRequestError,
        ModelNotFoundError,
        ModelUnavailableError,
        QueueFullError,
    )
    from ggufserve.generation.embeddings import EmbeddingResponse
    from ggufserve.python_api.conversion import convert, quantize
    from ggufserve.python_api.loading import load
    from ggufserve.python_api.model import Model
    from ggufserve.python_api.replies import ParsedChatCompletion
    from ggufserve.python_api.streams import AsyncChunkStream, ChunkStream
    from ggufserve.store.model_store import StoreError
    from ggufserve.store.pull import PullError

# Public name → the module that defines it.
_EXPORTS = {
    "load": "ggufserve.python_api.loading",
    "Model": "ggufserve.python_api.model",
    "ChunkStream": "ggufserve.python_api.streams",
    "AsyncChunkStream": "ggufserve.python_api.streams",
    "ParsedChatCompletion": "ggufserve.python_api.replies",
    "convert": "ggufserve.python_api.conversion",
    "quantize": "ggufserve.python_api.conversion",
    "ChatCompletion": "ggufserve.api.wire",
    "ChatCompletionChunk": "ggufserve.api.wire",
    "Completion": "ggufserve.api.wire",
    "EmbeddingResponse": "ggufserve.generation.embeddings",
    "APIError": "ggufserve.errors",
    "InvalidRequestError": "ggufserve.errors",
    "ContextLengthExceededError": "ggufserve.errors",
    "ModelNotFoundError": "ggufserve.errors",
    "ModelUnavailableError": "ggufserve.errors",
    "QueueFullError": "ggufserve.errors",
    "InternalServerError": "ggufserve.errors",
    "PullError": "ggufserve.store.pull",
    "StoreError": "ggufserve.store.model_store",
}

__all__ = [
    "APIError",
    "AsyncChunkStream",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChunkStream",
    "Completion",
    "ContextLengthExceededError",
    "EmbeddingResponse",
    "InternalServerError",
    "InvalidRequestError",
    "Model",
    "ModelNotFoundError",
    "ModelUnavailableError",
    "ParsedChatCompletion",
    "PullError",
    "QueueFullError",
    "StoreError",
    "convert",
    "load",
    "quantize",
    "store",
]


def __getattr__(name: str) -> Any:
    if name == "store":
        return importlib.import_module("ggufserve.store")
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ggufserve' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
