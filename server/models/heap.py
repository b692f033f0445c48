"""Keep the garbage collector's full passes short: long-lived objects (imported modules,
the app, each loaded model's Python side) move to the permanent generation.

A full collection holds the GIL for its whole pass, and the event loop waits on the GIL:
a serving process holds ~78,000 objects (almost all from imports; a loaded model adds ~340)
and a full pass over them took 32 ms here (more on a slower machine), long enough to push
``/health`` past its 100 ms bound whenever a big request's allocations triggered one.
Frozen objects are skipped by every pass (:func:`gc.freeze`, CPython >= 3.7).
"""

from __future__ import annotations

import gc


def settle_heap() -> None:
    """Collect once over everything (an unloaded model's reference cycles included), then
    freeze what survives. Called at start-up and after each model load and unload (on the
    loader thread): one full pass, ~30 ms of GIL, per event instead of per request."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
