"""``ggufserve pull SOURCE``: make a store entry from a Hugging Face repo (safetensors:
convert + quantize; GGUF: download the chosen file and its mmproj), a local checkpoint
folder or a local GGUF, unless the store already has one for the same source, revision
and quant type.

The converter is imported only when a conversion is needed: serving never needs it.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import re
import time
from pathlib import Path

from ggufserve.models.memory import SPLIT_GGUF
from ggufserve.store.model_store import ModelStore, StoreError, StoreRecord

log = logging.getLogger(__name__)

DEFAULT_QUANT = "Q4_K_M"
# Served as converted, without a quantization pass.
FLOAT_TYPES = ("F32", "F16", "BF16")
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class PullError(Exception):
    """SOURCE cannot be made into a store entry (message says why and what to do)."""


def pull(
    store: ModelStore, source: str, quant: str = DEFAULT_QUANT, *, report: bool = True
) -> tuple[StoreRecord, bool]:
    """The store entry for ``source`` as ``quant``; made now if the store has none.

    Args:
        source: A local GGUF file, a checkpoint folder, a store id, or ``owner/name`` on
            the Hugging Face Hub (its cache and ``HF_HUB_OFFLINE`` honoured).
        quant: llama.cpp type (``Q4_K_M``, ...; ``F16``/``BF16``/``F32`` keep the float
            conversion).
        report: Measure the quantization's quality (converter's report).

    Returns:
        The record and whether it was made by this call (False: found in the store).

    Raises:
        PullError: unknown source, unsupported quant, download or conversion failure, or
            the store's disk is full (nothing partial is kept).
        StoreError: replacing an entry that a running server has loaded.
    """
    try:
        return _pull(store, source, quant.upper(), report)
    except OSError as exc:  # the record of a registered GGUF cannot be written
        raise PullError(_write_failure(exc, store, source)) from None


def _pull(store: ModelStore, source: str, quant: str, report: bool) -> tuple[StoreRecord, bool]:
    path = Path(source).expanduser()
    if path.is_file():
        return _local_gguf(store, path.resolve())
    if path.is_dir():
        folder = path.resolve()
        name = path.absolute().name  # as the user named it (the folder may be a link)
        return _converted(store, str(folder), _fingerprint(folder), quant, name, report)
    stored = store.find(source)
    if stored is not None:
        return stored, False
    if REPO_ID.match(source):
        return _from_hub(store, source, quant, report)
    raise PullError(
        f"'{source}' is not a GGUF file, a checkpoint folder, a stored model id "
        "(see 'ggufserve ls') or a Hugging Face repo id (owner/name)"
    )


def _fingerprint(folder: Path) -> str:
    """A revision for a local folder: hash of its files' names, sizes and mtimes."""
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return "local-" + digest.hexdigest()[:16]


def _clean_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def _converted(
    store: ModelStore, source: str, revision: str, quant: str, name: str, report: bool
) -> tuple[StoreRecord, bool]:
    """Find, or convert (+ quantize) into the store."""
    found = store.find_key(source, revision, quant)
    if found is not None:
        return found, False
    from ggufserve.converters.convert import convert
    from ggufserve.converters.errors import ConversionError
    from ggufserve.converters.quantize import QUANT_TYPES

    if quant not in QUANT_TYPES and quant not in FLOAT_TYPES:
        known = ", ".join([*FLOAT_TYPES, *QUANT_TYPES])
        raise PullError(f"unknown quant type '{quant}' (known: {known})")
    name = _clean_name(name)
    model_id = store.free_id(f"{name}:{quant}", source)
    started = time.monotonic()
    with store.staging(model_id) as folder:
        floating = quant in FLOAT_TYPES
        try:
            result = convert(
                source,
                out_dir=folder,
                name=name,
                outtype=quant.lower() if floating else "auto",
                quants=[] if floating else [quant],
                report=report,
            )
            served = result.text if floating else result.quantized[quant]
            if not floating:
                # The float intermediate is only the quantizer's input: don't keep GBs of it.
                result.text.unlink()
            arch, n_params = gguf_summary(served)
            record = StoreRecord(
                id=model_id,
                source=source,
                revision=revision,
                quant=quant,
                gguf=str(served),
                mmproj=str(result.mmproj) if result.mmproj else None,
                architecture=arch,
                n_params=n_params,
                created=time.time(),
                seconds={**result.seconds, "pull": time.monotonic() - started},
            )
            return store.commit(record, folder), True
        except ConversionError as exc:
            raise PullError(str(exc)) from None
        except OSError as exc:
            raise PullError(_write_failure(exc, store, model_id)) from None


def _write_failure(exc: OSError, store: ModelStore, what: str) -> str:
    """One line for an OSError while making ``what`` (a full disk said in words)."""
    if exc.errno == errno.ENOSPC:
        return (
            f"no space left on the store's disk ({store.home}) while making '{what}'; "
            "nothing was kept: free some space or set GGUFSERVE_HOME to a larger disk"
        )
    return f"cannot make '{what}' in {store.home}: {exc.strerror or exc}"


def gguf_summary(path: Path) -> tuple[str | None, int | None]:
    """(``general.architecture``, parameter count) of a GGUF, or (None, None) when llama.cpp
    cannot read it. Read by llama.cpp with ``vocab_only`` (~1 s: gguf-py's reader parses a
    262k-token vocabulary in Python, ~20 s)."""
    import ctypes

    import llama_cpp
    from llama_cpp._logger import set_verbose

    set_verbose(False)
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        return None, None
    try:
        value = ctypes.create_string_buffer(256)
        found = llama_cpp.llama_model_meta_val_str(model, b"general.architecture", value, 256)
        arch = value.value.decode() if found >= 0 else None
        return arch, int(llama_cpp.llama_model_n_params(model))
    finally:
        llama_cpp.llama_model_free(model)


def _local_gguf(store: ModelStore, path: Path) -> tuple[StoreRecord, bool]:
    """Register a local GGUF (not copied) with an ``mmproj-*.gguf`` beside it, if one."""
    if path.suffix.lower() != ".gguf":
        raise PullError(f"'{path.name}' is not a .gguf file")
    stat = path.stat()
    revision = f"local-{stat.st_size}-{stat.st_mtime_ns}"
    found = store.find_key(str(path), revision, "GGUF")
    if found is not None:
        return found, False
    arch, n_params = gguf_summary(path)  # ~1 s: only for a file not yet recorded
    if arch is None:
        raise PullError(f"'{path.name}' is not a readable GGUF file")
    mmprojs = sorted(p for p in path.parent.glob("mmproj*.gguf") if p != path)
    record = StoreRecord(
        id=store.free_id(_clean_name(path.stem), str(path)),
        source=str(path),
        revision=revision,
        quant="GGUF",
        gguf=str(path),
        mmproj=str(mmprojs[0]) if len(mmprojs) == 1 else None,
        architecture=arch,
        n_params=n_params,
        created=time.time(),
    )
    return store.commit(record, None), True


def _repo_files(repo: str) -> tuple[str, list[str]]:
    """(commit, file names) of a Hub repo: asked online, else from the local HF cache.

    Raises:
        PullError: not reachable and not cached.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        info = HfApi().model_info(repo)
        return str(info.sha), [s.rfilename for s in info.siblings or []]
    except (OfflineModeIsEnabled, OSError, HfHubHTTPError) as exc:
        log.info("Hub not reachable for %s (%s); using the local cache", repo, type(exc).__name__)
    try:
        snapshot = Path(snapshot_download(repo_id=repo, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise PullError(
            f"'{repo}' is not in the Hugging Face cache and the Hub cannot be reached "
            "(offline, or HF_HUB_OFFLINE=1)"
        ) from None
    files = [str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file()]
    return snapshot.name, files


def _from_hub(store: ModelStore, repo: str, quant: str, report: bool) -> tuple[StoreRecord, bool]:
    commit, files = _repo_files(repo)
    name = repo.split("/")[1]
    if any(f.endswith(".safetensors") for f in files):
        return _converted(store, repo, commit, quant, name, report)
    ggufs = [f for f in files if f.lower().endswith(".gguf")]
    if not ggufs:
        raise PullError(f"'{repo}' has neither safetensors weights nor GGUF files")
    found = store.find_key(repo, commit, quant)
    if found is not None:
        return found, False
    model_files = _pick(ggufs, quant, repo)
    mmprojs = sorted(f for f in ggufs if Path(f).name.lower().startswith("mmproj"))
    # An F16 projector where offered: the projector is small and precision-sensitive.
    mmproj = next((f for f in mmprojs if "f16" in f.lower()), mmprojs[0] if mmprojs else None)
    paths = [_download(repo, f, commit) for f in [*model_files, *([mmproj] if mmproj else [])]]
    served = paths[0]
    arch, n_params = gguf_summary(served)
    record = StoreRecord(
        id=store.free_id(f"{_clean_name(name)}:{quant}", repo),
        source=repo,
        revision=commit,
        quant=quant,
        gguf=str(served),
        mmproj=str(paths[-1]) if mmproj else None,
        architecture=arch,
        n_params=n_params,
        created=time.time(),
    )
    return store.commit(record, None), True


def _pick(ggufs: list[str], quant: str, repo: str) -> list[str]:
    """The model file(s) of ``quant`` (every shard of a split GGUF, first shard first)."""
    wanted = re.compile(rf"(^|[-_.]){re.escape(quant)}([-_.]|$)", re.IGNORECASE)
    models = sorted(
        f for f in ggufs if wanted.search(Path(f).name) and not Path(f).name.startswith("mmproj")
    )
    if not models:
        offered = sorted({Path(f).name for f in ggufs})
        raise PullError(f"'{repo}' has no {quant} GGUF (files: {', '.join(offered[:12])})")
    first = models[0]
    split = SPLIT_GGUF.search(first)
    if split is None:
        return [first]
    stem = first[: split.start()]
    return [f for f in models if f.startswith(stem) and SPLIT_GGUF.search(f)]


def _download(repo: str, filename: str, commit: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename, revision=commit))
    except LocalEntryNotFoundError:
        raise PullError(f"'{repo}/{filename}' is not cached and cannot be downloaded") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise PullError(f"cannot download '{repo}/{filename}': {type(exc).__name__}") from None


__all__ = ["DEFAULT_QUANT", "PullError", "StoreError", "pull"]
