"""``ggufserve pull / ls / rm / ps``: the model store's commands, printed as tables."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from ggufserve.store.model_store import ModelStore, StoreRecord


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, two spaces apart."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_count(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def quality_cell(record: StoreRecord) -> str:
    """``KL 0.012 top1 97.1%`` from the served file's quality report, or ``-``."""
    from ggufserve.converters.quality import read_quality

    figures = read_quality(Path(record.gguf))
    if not figures:
        return "-"
    return f"KL {figures['kl_mean']:.4f} top1 {100 * figures['top1_agreement']:.1f}%"


def ls_command(store: ModelStore) -> int:
    records = store.records()
    if not records:
        print(f"the store is empty ({store.root}); 'ggufserve pull SOURCE' adds a model")
        return 0
    rows = [
        [
            r.id,
            r.architecture or "-",
            human_count(r.n_params),
            r.quant,
            human_bytes(r.size_bytes()),
            "yes" if r.mmproj else "-",
            quality_cell(r),
            f"{r.source}@{r.revision[:12]}",
        ]
        for r in records
    ]
    header = ["ID", "ARCH", "PARAMS", "QUANT", "SIZE", "MMPROJ", "QUALITY", "SOURCE"]
    print(table(header, rows))
    return 0


def rm_command(store: ModelStore, ids: list[str]) -> int:
    """Remove each id; StoreError (unknown, in use) propagates for the first failure."""
    for model_id in ids:
        record = store.remove(model_id)
        print(f"removed {record.id}")
    return 0


def pull_command(store: ModelStore, args: argparse.Namespace) -> int:
    from ggufserve.store.pull import pull

    started = time.monotonic()
    record, made = pull(store, args.source, args.quant, report=args.report)
    verb = "pulled" if made else "already in the store:"
    seconds = time.monotonic() - started
    print(f"{verb} {record.id} ({human_bytes(record.size_bytes())}, {seconds:.1f} s)")
    return 0


def ps_rows(cards: list[dict[str, Any]], now: float) -> list[list[str]]:
    """The loaded (or loading) models of a ``/v1/models`` answer, as table rows."""
    rows = []
    for card in cards:
        if card.get("state") not in ("ready", "loading"):
            continue
        memory = card.get("memory_bytes")
        idle = card.get("idle_s")
        expires = card.get("expires_at")
        rows.append(
            [
                card["id"],
                card["state"],
                human_bytes(memory) if memory is not None else "-",
                str(card.get("in_flight", 0)),
                f"{idle:.0f} s" if idle is not None else "-",
                f"in {max(0.0, expires - now):.0f} s" if expires is not None else "never",
            ]
        )
    return rows


def ps_command(url: str, api_key: str | None) -> int:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{url.rstrip('/')}/v1/models", headers=headers, timeout=10)
    except httpx.TransportError:
        print(f"ggufserve: error: no server answers at {url}", file=sys.stderr)
        return 1
    if response.status_code != 200:
        message = response.json().get("error", {}).get("message", response.reason_phrase)
        print(f"ggufserve: error: {url}: {message}", file=sys.stderr)
        return 1
    rows = ps_rows(response.json()["data"], time.time())
    if not rows:
        print("no model is loaded")
        return 0
    print(table(["ID", "STATE", "MEMORY", "IN FLIGHT", "IDLE", "UNLOADS"], rows))
    return 0
