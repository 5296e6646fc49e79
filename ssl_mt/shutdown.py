"""A command's exit without CPython's final collection of the whole heap.

When a command ends, interpreter finalisation runs a full garbage collection over every
object still alive: after torch, timm and Lightning are imported and a Trainer has run,
millions of them, about 3 s on a 2-core CPU, once per command (``make demo`` runs five).
:func:`freeze_heap_at_exit` registers :func:`gc.freeze` with :mod:`atexit`: at exit, after
the jobs of a Hydra multirun and the exit handlers registered later (trackers, loggers),
what is alive moves to the permanent generation, which that collection skips.

Nothing written is at stake: the code that writes a file closes it, and Python never
promised to run destructors at interpreter exit.
"""

from __future__ import annotations

import atexit
import gc

_registered = False


def freeze_heap_at_exit() -> None:
    """Registers the freeze once per process (idempotent); called first by every command."""
    global _registered
    if not _registered:
        atexit.register(gc.freeze)
        _registered = True
