"""``--register``: add or update a ``models.yaml`` entry for converted files, keeping the
file's comments and order (ruamel.yaml round-trip)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from ggufserve.converters.errors import ConversionError
from ggufserve.converters.writer import atomic_path


class RegistrationError(ConversionError):
    """The models file cannot be read or is not a mapping with a ``models`` list."""


def _relative(path: Path, base: Path) -> str:
    """Relative to the models file when inside its folder, else absolute."""
    path, base = path.resolve(), base.resolve()
    return str(path.relative_to(base)) if path.is_relative_to(base) else str(path)


def register(models_file: Path, model_id: str, gguf: Path, mmproj: Path | None) -> None:
    """Add (or replace) the entry ``model_id`` pointing at ``gguf`` (and ``mmproj``).

    Raises:
        RegistrationError: the file exists but is not valid YAML of the expected shape.
    """
    yaml = YAML()
    yaml.preserve_quotes = True
    data: Any
    if models_file.is_file():
        try:
            data = yaml.load(models_file.read_text(encoding="utf-8"))
        except YAMLError:
            raise RegistrationError(f"{models_file} is not valid YAML") from None
    else:
        data = None
    if data is None:
        data = {"models": []}
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise RegistrationError(f"{models_file} has no 'models' list")
    base = models_file.parent
    entry: dict[str, Any] = {"id": model_id, "gguf": {"path": _relative(gguf, base)}}
    if mmproj is not None:
        entry["mmproj"] = {"path": _relative(mmproj, base)}
    models = data["models"]
    for index, existing in enumerate(models):
        if isinstance(existing, dict) and existing.get("id") == model_id:
            existing.update(entry)
            models[index] = existing
            break
    else:
        models.append(entry)
    with atomic_path(models_file) as tmp, tmp.open("w", encoding="utf-8") as handle:
        yaml.dump(data, handle)
