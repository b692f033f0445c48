"""The hook through which models besides ``models.yaml`` are served (the local model
store implements it: :class:`ggufserve.store.model_store.ModelStore`).

The registry asks the catalog only when an id is not in ``models.yaml`` (those ids win),
and when listing ``/v1/models``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ggufserve.settings import ModelEntry


class ModelCatalog(Protocol):
    """Models offered besides models.yaml (the local model store)."""

    def entries(self) -> list[ModelEntry]:
        """Every model the catalog offers now (absolute file paths); cheap, called per
        lookup miss and per /v1/models."""

    def hold(self, model_id: str) -> Callable[[], None]:
        """Mark the model's files in use while loaded (``ggufserve rm`` refuses them);
        returns the release function."""
