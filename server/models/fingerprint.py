"""``system_fingerprint``: which build served a reply, from which model files."""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"


def system_fingerprint(files: tuple[Path, Path | None]) -> str:
    """A stable id of the software and model files behind a reply: ``fp_`` and 12 hex
    digits of a SHA-256 over the ggufserve and llama-cpp-python versions and each file's
    name, size and modification time (not its bytes: hashing gigabytes per load would
    take seconds). It changes when either build or a model file changes, as OpenAI's
    does when its backend changes.

    Raises:
        OSError: a model file cannot be stat'ed.
    """
    digest = hashlib.sha256()
    for part in (_version("ggufserve"), _version("llama_cpp_python")):
        digest.update(part.encode() + b"\0")
    for path in files:
        if path is not None:
            stat = path.stat()
            digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return "fp_" + digest.hexdigest()[:12]
