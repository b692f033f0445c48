"""The local model store and ``pull``; :func:`models` and :func:`remove` are the Python
API's ``ggufserve.store.models()`` / ``ggufserve.store.remove(id)`` (``ggufserve ls / rm``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ggufserve.store.model_store import StoreRecord


def models(home: str | Path | None = None) -> list[StoreRecord]:
    """Every stored model (id, source, quant, GGUF paths...), by id, as ``ggufserve ls``
    lists them; ``home`` defaults to ``$GGUFSERVE_HOME``, else ``~/.cache/ggufserve``."""
    from ggufserve.store.model_store import ModelStore

    return ModelStore(Path(home).expanduser() if home is not None else None).records()


def remove(model_id: str, home: str | Path | None = None) -> StoreRecord:
    """Delete a stored model's folder (``ggufserve rm``); its record is returned.

    Raises:
        StoreError: no such id, or a running server (or ``ggufserve.load`` Model) has it loaded.
    """
    from ggufserve.store.model_store import ModelStore

    return ModelStore(Path(home).expanduser() if home is not None else None).remove(model_id)
