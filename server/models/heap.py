"""Keep the garbage collector's full passes short: long-lived objects (imported modules, a
loaded model's vocabulary tables and template) move to the permanent generation.

A full collection holds the GIL for its whole pass, and the event loop waits on the GIL:
with a model loaded the heap holds ~78,000 objects and a full pass took 32 ms here (more on
a slower machine), long enough to push ``/health`` past its 100 ms bound whenever a big
request's allocations triggered one. Frozen objects are skipped by every pass
(:func:`gc.freeze`, CPython >= 3.7).
"""

from __future__ import annotations

import gc


def freeze_long_lived() -> None:
    """Exempt every object alive now from later collections (cheap: no pass is run).
    Called at start-up and after each model load, when what is alive is meant to stay."""
    gc.freeze()


def thaw() -> None:
    """Return frozen objects to the oldest generation, after a model unload: any reference
    cycles the unloaded model leaves are then freed by the next full pass."""
    gc.unfreeze()
