"""Progress for long steps: a tqdm bar on a terminal, a few plain lines on anything else
(a log file or a pipe gets no carriage-return redraws)."""

from __future__ import annotations

import sys
from typing import Protocol, TextIO

from tqdm import tqdm

PLAIN_STEPS = 4  # plain lines at 25 %, 50 %, 75 %, 100 %


class Progress(Protocol):
    def update(self, n: int = 1) -> object: ...

    def close(self) -> None: ...


class PlainProgress:
    """``label: 50% (118/236 tensors)`` each time another quarter is done."""

    def __init__(self, total: int, label: str, unit: str, stream: TextIO):
        self.total = max(1, total)
        self.label = label
        self.unit = unit
        self.stream = stream
        self.done = 0
        self.shown = 0  # quarters printed so far

    def update(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        step = self.done * PLAIN_STEPS // self.total
        if step > self.shown:
            self.shown = step
            percent = 100 * self.done // self.total
            print(
                f"{self.label}: {percent}% ({self.done}/{self.total} {self.unit})",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        pass


def progress(total: int, label: str, unit: str, stream: TextIO | None = None) -> Progress:
    """A bar counting ``total`` ``unit``s on ``stream`` (default: stderr)."""
    stream = stream or sys.stderr
    if stream.isatty():
        return tqdm(total=total, desc=label, unit=unit, file=stream)
    return PlainProgress(total, label, unit, stream)
