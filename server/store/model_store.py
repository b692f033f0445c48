"""The local model store: converted, quantized or downloaded models, kept for reuse.

Layout under ``$GGUFSERVE_HOME`` (default ``~/.cache/ggufserve``)::

    models/<slug>/record.json        what the entry is (:class:`StoreRecord`)
    models/<slug>/<name>-<QUANT>.gguf  converted + quantized files (+ mmproj, quality JSON)

Files downloaded from Hugging Face GGUF repos stay in huggingface_hub's own cache; their
record points there. An entry is keyed by (source, revision, quant): the same key is
never converted twice. A running server holds a shared ``flock`` on the record of every
store model it has loaded, so :meth:`ModelStore.remove` can refuse a model in use.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from pydantic import BaseModel, ValidationError

from ggufserve.settings import FileSource, ModelEntry

RECORD = "record.json"
STORE_DIR = "models"


class StoreError(Exception):
    """A store operation cannot be done (unknown id, model in use, unreadable record)."""


def default_home() -> Path:
    """``$GGUFSERVE_HOME``, else ``~/.cache/ggufserve``."""
    home = os.environ.get("GGUFSERVE_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "ggufserve"


class StoreRecord(BaseModel):
    """One stored model.

    Attributes:
        id: Model id as served and listed (``<name>:<QUANT>``).
        source: What it was made from: a Hugging Face repo id or a local folder (absolute).
        revision: The repo commit, or a fingerprint of the local folder's files.
        quant: llama.cpp type of the served file (``Q4_K_M``, ``F16``, ...).
        gguf / mmproj: Absolute paths of the served files (mmproj None: text only).
        architecture: GGUF ``general.architecture``; n_params: parameter count.
        created: Unix time (s) the entry was made; seconds: time each step took.
    """

    id: str
    source: str
    revision: str
    quant: str
    gguf: str
    mmproj: str | None = None
    architecture: str | None = None
    n_params: int | None = None
    created: float
    seconds: dict[str, float] = {}

    def key(self) -> tuple[str, str, str]:
        return (self.source, self.revision, self.quant.upper())

    def model_entry(self) -> ModelEntry:
        """The entry the server loads (its other settings are models.yaml's defaults)."""
        return ModelEntry(
            id=self.id,
            gguf=FileSource(path=self.gguf),
            mmproj=FileSource(path=self.mmproj) if self.mmproj else None,
        )

    def size_bytes(self) -> int:
        """Bytes on disk of the served files (0 for one that has gone)."""
        paths = [Path(self.gguf), *([Path(self.mmproj)] if self.mmproj else [])]
        return sum(p.stat().st_size for p in paths if p.is_file())


def slug(model_id: str) -> str:
    """A folder name for an id (``google/gemma:Q4_K_M`` → ``google--gemma--Q4_K_M``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "--", model_id)


class ModelStore:
    """The store at ``home`` (see the module docstring). Implements the server's
    ``ModelCatalog``: :meth:`entries` and :meth:`hold`.

    Args:
        home: Store root (default :func:`default_home`).
    """

    def __init__(self, home: Path | None = None):
        self.home = home or default_home()
        self.root = self.home / STORE_DIR

    def records(self) -> list[StoreRecord]:
        """Every readable record, by id; unreadable ones are skipped (``ls`` says so)."""
        found = []
        for path in sorted(self.root.glob(f"*/{RECORD}")):
            if path.parent.name.startswith("."):  # staging, or a removal in progress
                continue
            with contextlib.suppress(OSError, ValidationError):
                found.append(StoreRecord.model_validate_json(path.read_bytes()))
        return sorted(found, key=lambda r: r.id)

    def find(self, model_id: str) -> StoreRecord | None:
        return next((r for r in self.records() if r.id == model_id), None)

    def find_key(self, source: str, revision: str, quant: str) -> StoreRecord | None:
        """The entry made from ``source`` at ``revision`` as ``quant``, if its files exist."""
        key = (source, revision, quant.upper())
        for record in self.records():
            if record.key() == key and Path(record.gguf).is_file():
                return record
        return None

    def free_id(self, wanted: str, source: str) -> str:
        """``wanted`` unless another source's entry has it; then ``wanted`` + a suffix."""
        taken = {r.id: r.source for r in self.records()}
        candidate, n = wanted, 2
        while candidate in taken and taken[candidate] != source:
            candidate, n = f"{wanted}-{n}", n + 1
        return candidate

    @contextlib.contextmanager
    def staging(self, model_id: str) -> Iterator[Path]:
        """A fresh folder to build an entry in; removed unless :meth:`commit` moved it.

        Interrupting (Ctrl-C) or failing inside the block leaves nothing behind. The folder
        is locked (``flock``) while the block runs, so the staging folders of a process
        that was killed (SIGKILL, power loss) are told from live ones and removed here,
        with any folder a killed ``rm`` left.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        # One process at a time sweeps and creates (a lock on the store folder itself), so
        # a new folder is locked before a sweep can see it.
        with self._exclusive(self.root):
            self._sweep_stale()
            folder = self.root / f".staging-{slug(model_id)}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            folder.mkdir()
            owner = os.open(folder, os.O_RDONLY)
            fcntl.flock(owner, fcntl.LOCK_EX)
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            os.close(owner)

    @staticmethod
    @contextlib.contextmanager
    def _exclusive(folder: Path) -> Iterator[None]:
        handle = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield
        finally:
            os.close(handle)

    def _sweep_stale(self) -> None:
        """Remove staging folders no live process holds, and leftovers of a killed ``rm``."""
        for folder in self.root.glob(".staging-*"):
            try:
                owner = os.open(folder, os.O_RDONLY)
            except OSError:
                continue
            try:
                fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a pull in progress
            finally:
                os.close(owner)
            shutil.rmtree(folder, ignore_errors=True)
        for doomed in self.root.glob(".removing-*"):
            shutil.rmtree(doomed, ignore_errors=True)

    def commit(self, record: StoreRecord, staged: Path | None) -> StoreRecord:
        """Move ``staged`` (its files named by ``record``) into place and write the record
        last, so an entry without its files is never listed. Replaces an entry with the
        same id (a re-conversion of a changed source).

        Raises:
            StoreError: the id's current entry is in use by a running server.
            OSError: the record cannot be written (disk full: errno ENOSPC).
        """
        final = self.root / slug(record.id)
        if self.find(record.id) is not None:
            self.remove(record.id)
        elif final.exists():  # files without a record: a commit that was killed midway
            self._discard(final)
        if staged is not None:
            staged.rename(final)
            moved = {"gguf": record.gguf, "mmproj": record.mmproj}
            updates = {
                key: str(final / Path(value).name)
                for key, value in moved.items()
                if value is not None and Path(value).parent == staged
            }
            record = record.model_copy(update=updates)
        else:
            final.mkdir(parents=True)
        tmp = final / f".{RECORD}.tmp"
        tmp.write_text(record.model_dump_json(indent=2), encoding="utf-8")
        tmp.replace(final / RECORD)
        return record

    def remove(self, model_id: str) -> StoreRecord:
        """Delete the entry's folder (files downloaded to the HF cache stay there).

        Raises:
            StoreError: no such id, or a running server has the model loaded.
        """
        record = self.find(model_id)
        if record is None:
            raise StoreError(f"no model '{model_id}' in the store ({self.root})")
        folder = self.root / slug(model_id)
        with open(folder / RECORD, "rb") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreError(
                    f"'{model_id}' is loaded by a running server; stop it or wait for its "
                    "keep_alive to expire, then retry"
                ) from None
            self._discard(folder)
        return record

    @staticmethod
    def _discard(folder: Path) -> None:
        # Renamed first so a concurrent load never sees a half-deleted folder; a leftover
        # of a killed removal is swept by the next staging.
        doomed = folder.with_name(f".removing-{folder.name}-{time.time_ns()}")
        folder.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    # ModelCatalog
    def entries(self) -> list[ModelEntry]:
        """Every stored model whose GGUF is present, as a server entry."""
        return [r.model_entry() for r in self.records() if Path(r.gguf).is_file()]

    def hold(self, model_id: str) -> Callable[[], None]:
        """Take a shared lock on the entry's record while the model is loaded; the returned
        function releases it. A model not in the store gets a no-op release."""
        path = self.root / slug(model_id) / RECORD
        try:
            handle = open(path, "rb")  # noqa: SIM115 (held until released)
        except OSError:
            return lambda: None
        fcntl.flock(handle, fcntl.LOCK_SH)
        return handle.close
