"""``ggufserve.load(source)``: what ``ggufserve run SOURCE`` serves (the same store
resolution: :func:`ggufserve.store.pull.pull`), loaded in this process."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ggufserve.python_api.model import Model, ProgressCallback
from ggufserve.settings import ModelEntry, ServerSettings
from ggufserve.store.model_store import ModelStore
from ggufserve.store.pull import DEFAULT_QUANT, pull


def load(
    source: str | Path,
    *,
    quant: str = DEFAULT_QUANT,
    n_ctx: int | None = None,
    n_parallel: int | None = None,
    n_gpu_layers: int | None = None,
    progress: bool | ProgressCallback | None = None,
    report: bool = True,
    home: str | Path | None = None,
    settings: ServerSettings | None = None,
    **entry: Any,
) -> Model:
    """Find or make ``source``'s store entry, then load it: a :class:`Model`.

    Args:
        source: A GGUF file, a checkpoint folder, a store id (``ggufserve ls``) or a
            Hugging Face repo id (``owner/name``: GGUF repos are downloaded, safetensors
            ones converted and quantized once, then reused from the store).
        quant: The llama.cpp type wanted from a repo or checkpoint (``F16``/``BF16``/``F32``
            keep the float conversion); ignored for a GGUF file or a store id.
        n_ctx / n_parallel / n_gpu_layers: ``models.yaml`` keys (tokens shared by all
            sequences / sequences decoded together / layers offloaded, -1 all); None keeps
            the ``models.yaml`` default (8192 / 4 / -1).
        progress: True: a tqdm bar of the weights loading on stderr; a callable: called as
            ``progress("load", fraction)`` (0..1) from this thread. A conversion prints
            its own bars.
        report: Measure a new quantization's quality (the converter's report).
        home: The store's folder (default ``$GGUFSERVE_HOME``, else ``~/.cache/ggufserve``).
        settings: Server limits (default: ``GGUFSERVE_*`` variables, else the defaults).
        **entry: Other ``models.yaml`` keys: ``id``, ``embeddings``, ``mmproj``,
            ``chat_template``, ``sampling``, ``n_threads``, ``n_batch``, ...

    Raises:
        PullError: the source is unknown or cannot be downloaded / converted.
        StoreError: the store cannot be read or written.
        pydantic.ValidationError (a ``ValueError``): a ``models.yaml`` key out of range.
        ModelUnavailableError: the model failed to load (code ``model_load_failed``).
    """
    store = ModelStore(Path(home).expanduser() if home is not None else None)
    record, _made = pull(store, str(source), quant, report=report)
    keys = {"n_ctx": n_ctx, "n_parallel": n_parallel, "n_gpu_layers": n_gpu_layers}
    chosen = {key: value for key, value in keys.items() if value is not None}
    base = record.model_entry().model_dump(exclude_unset=True)
    model_entry = ModelEntry.model_validate({**base, **chosen, **entry}, strict=False)
    with _reporter(progress, model_entry.id) as report_load:
        return Model(model_entry, settings, progress=report_load)


class _reporter:
    """The load callback for ``progress`` (a tqdm bar for True), closed on exit."""

    def __init__(self, progress: bool | ProgressCallback | None, model_id: str):
        self._bar: Any = None
        self.callback: ProgressCallback | None = None
        if progress is True:
            from tqdm import tqdm

            self._bar = tqdm(total=100, desc=f"loading {model_id}", unit="%", file=sys.stderr)
            self.callback = self._update
        elif callable(progress):
            self.callback = progress

    def _update(self, stage: str, fraction: float) -> None:
        self._bar.update(round(100 * fraction) - self._bar.n)

    def __enter__(self) -> Callable[[str, float], None] | None:
        return self.callback

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()
