"""Timing primitives: a loader's endless batch stream, timed device steps, loader-fed steps
and loaders alone."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ssl_mt.bench.instruments import WindowTimer, to_device
from ssl_mt.bench.settings import BenchSettings
from ssl_mt.callbacks.throughput import batch_images


class BatchStream:
    """Endless batches of a DataLoader, epoch after epoch (``set_epoch`` as Lightning does).

    ``position`` is the index of the last batch within its epoch.
    """

    def __init__(self, loader) -> None:
        self.loader = loader
        self.epoch = 0
        self.position = -1
        self._it: Iterator | None = None

    def next(self) -> Any:
        for _ in range(2):
            if self._it is None:
                self.loader.sampler.set_epoch(self.epoch)
                self._it = iter(self.loader)
                self.position = -1
            try:
                batch = next(self._it)
            except StopIteration:
                self._it = None
                self.epoch += 1
                continue
            self.position += 1
            return batch
        raise RuntimeError("the loader yields no batch: dataset smaller than one batch?")

    def close(self) -> None:
        self._it = None
        self.loader = None


def time_device_steps(
    step: Callable[[Any], None], batch: Any, s: BenchSettings, device: torch.device
) -> WindowTimer:
    """The window of ``s.steps`` steps on one device batch, after ``s.warmup`` untimed ones."""
    for _ in range(s.warmup):
        step(batch)
    with WindowTimer(device) as timer:
        for _ in range(s.steps):
            step(batch)
    return timer


def time_e2e_steps(
    step: Callable[[Any], None],
    stream: BatchStream,
    prepare: Callable[[Any], Any],
    s: BenchSettings,
    device: torch.device,
) -> tuple[WindowTimer, float]:
    """(window, seconds blocked in ``next(loader)``) of ``s.steps`` loader-fed steps."""
    for _ in range(s.warmup):
        step(prepare(to_device(stream.next(), device)))
    waited = 0.0
    with WindowTimer(device) as timer:
        for _ in range(s.steps):
            t0 = time.perf_counter()
            batch = stream.next()
            waited += time.perf_counter() - t0
            step(prepare(to_device(batch, device)))
    return timer, waited


def time_loader(stream: BatchStream, workers: int, timed_batches: int) -> tuple[float, int, int]:
    """Steady-state loading: (seconds, images, batches) over ``timed_batches`` batches.

    The first batches of every epoch (one per worker; the very first one without workers)
    are not timed: they carry the workers' start, not their throughput.
    """
    seconds, images, batches = 0.0, 0, 0
    per_epoch = len(stream.loader)
    while batches < timed_batches:
        t0 = time.perf_counter()
        batch = stream.next()
        elapsed = time.perf_counter() - t0
        skip = workers if workers > 0 else int(stream.epoch == 0)
        if stream.position < min(skip, per_epoch - 1):
            continue
        seconds += elapsed
        images += batch_images(batch)
        batches += 1
    return seconds, images, batches
