"""Evaluation batches kept in memory after their first complete pass, within a byte budget.

An evaluation item has no random augmentation (resize, normalise), so every epoch decodes
the same files into the same tensors. :class:`CachingDataLoader` records the collated
batches of its first complete pass and serves them from memory afterwards: no decoding, no
worker processes (they are shut down once the batches are held). ``data.eval_cache_mb``
bounds what one process holds over all its evaluation loaders (:class:`MemoryBudget`); a
loader whose batches do not fit reads its files every epoch, and says so once.

What is served is what the first pass produced, skipped bad samples included (their
descriptions travel in the batch as before). Nothing in the evaluation path writes into a
batch; a callback that did would change the held copy on a CPU run, where moving a batch to
the device returns the same tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader

log = logging.getLogger(__name__)

MIB = 2**20


class MemoryBudget:
    """Bytes that the evaluation loaders of one process may hold together."""

    def __init__(self, limit_mb: float) -> None:
        if limit_mb < 0:
            raise ValueError(f"data.eval_cache_mb must be >= 0 (0: off), got {limit_mb}")
        self.limit_mb = limit_mb
        self.limit = int(limit_mb * MIB)
        self.used = 0

    def reserve(self, nbytes: int) -> bool:
        """Takes ``nbytes`` from the budget if they fit."""
        if self.used + nbytes > self.limit:
            return False
        self.used += nbytes
        return True

    def release(self, nbytes: int) -> None:
        self.used = max(0, self.used - nbytes)


def batch_nbytes(batch: Any) -> int:
    """Bytes of the tensors in a (nested) batch."""
    if isinstance(batch, torch.Tensor):
        return batch.element_size() * batch.nelement()
    if isinstance(batch, Mapping):
        return sum(batch_nbytes(value) for value in batch.values())
    if isinstance(batch, (list, tuple)):
        return sum(batch_nbytes(value) for value in batch)
    return 0


class CachingDataLoader(DataLoader):
    """A DataLoader that replays its first complete pass from memory.

    Args:
        *args: DataLoader arguments; the sampler must give the same order every epoch.
        budget: The :class:`MemoryBudget` shared by the process's evaluation loaders.
        name: How the log names the loader (e.g. ``val@96``).
        **kwargs: DataLoader keyword arguments.
    """

    def __init__(self, *args: Any, budget: MemoryBudget, name: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.budget = budget
        self.name = name
        self.cached: list[Any] | None = None
        self.cacheable = budget.limit > 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        if self.cached is not None:
            return iter(self.cached)
        if not self.cacheable:
            return super().__iter__()
        return self._record(super().__iter__())

    def _record(self, batches: Iterator[Any]) -> Iterator[Any]:
        """Yields the batches of one pass; holds them once the pass has produced its last one
        within budget (Lightning stops asking after ``len(loader)`` batches)."""
        expected = len(self)
        held: list[Any] = []
        reserved = 0
        try:
            for batch in batches:
                if self.cacheable:
                    nbytes = batch_nbytes(batch)
                    if self.budget.reserve(nbytes):
                        held.append(batch)
                        reserved += nbytes
                    else:
                        self._give_up(reserved, nbytes)
                        self.budget.release(reserved)
                        held, reserved = [], 0
                if self.cacheable and len(held) == expected:
                    self._commit(held, reserved)
                    reserved = 0
                    yield batch
                    return  # the loader's iterator is not asked again: its workers are gone
                yield batch
        finally:
            if reserved:  # an interrupted pass (e.g. limit_val_batches): try again next time
                self.budget.release(reserved)

    def _commit(self, held: list[Any], reserved: int) -> None:
        self.cached = held
        self._stop_workers()
        log.info(
            "%s: %d batches (%.1f MiB) held in memory for the following passes "
            "(data.eval_cache_mb=%g)",
            self.name,
            len(held),
            reserved / MIB,
            self.budget.limit_mb,
        )

    def _give_up(self, reserved: int, nbytes: int) -> None:
        self.cacheable = False
        log.info(
            "%s: its batches need more than the %.1f MiB left of data.eval_cache_mb=%g "
            "(%.1f MiB and counting); its files are read every pass",
            self.name,
            (self.budget.limit - self.budget.used + reserved) / MIB,
            self.budget.limit_mb,
            (reserved + nbytes) / MIB,
        )

    def _stop_workers(self) -> None:
        """Persistent workers have nothing left to load once the batches are held."""
        iterator = getattr(self, "_iterator", None)
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._iterator = None
