"""Callbacks the reliability tests inject through the config (``+callbacks.NAME={_target_: ...}``).

They live in a plain module (not a conftest) because the training subprocesses import them
too: the tests put this folder on ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

PARK_LIMIT_S = 600.0


class StepBeacon(L.Callback):
    """Reports the training position and parks the process once at chosen batches.

    At every training batch it writes ``{"epoch", "batch", "global_step", "pid"}`` to ``path``.
    At each ``(epoch, batch)`` of ``block_at`` it creates a marker file (next to ``path``) and
    sleeps until killed, unless that marker exists already: a re-run of the very same
    command passes the points it was killed at.

    Args:
        path: The JSON file written at every batch.
        block_at: ``[[epoch, batch], ...]`` where to park the process, once each.
    """

    def __init__(self, path: str, block_at: list[list[int]] | None = None) -> None:
        self.path = Path(path)
        self.block_at = [tuple(int(v) for v in point) for point in (block_at or [])]

    def marker(self, epoch: int, batch: int) -> Path:
        return self.path.with_name(f"{self.path.stem}.parked-{epoch}-{batch}")

    def _write(self, **state: Any) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps({**state, "pid": os.getpid()}))
        os.replace(tmp, self.path)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        epoch = trainer.current_epoch
        state = {"epoch": epoch, "batch": batch_idx, "global_step": trainer.global_step}
        if (epoch, batch_idx) in self.block_at and not self.marker(epoch, batch_idx).exists():
            self.marker(epoch, batch_idx).touch()
            self._write(**state, parked=True)
            deadline = time.monotonic() + PARK_LIMIT_S
            while time.monotonic() < deadline:  # until SIGKILL
                time.sleep(0.5)
            os._exit(3)  # the test that parked it is gone: never leave an orphan behind
        self._write(**state, parked=False)


class StopAfterEpoch(L.Callback):
    """Ends ``fit`` after epoch ``epoch`` as if the job had been stopped at that boundary.

    The end-of-epoch checkpoint is still written (ModelCheckpoint runs after this callback).
    """

    def __init__(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


class LeakOutputs(L.Callback):
    """A deliberate leak: keeps every training batch's outputs plus ``mb_per_step`` MiB.

    What a ``training_step_outputs.append(...)`` without a reset does to a long run; the tiny
    test model's outputs are a few KiB, so a ballast tensor stands for the real model's.
    """

    def __init__(self, mb_per_step: float = 4.0) -> None:
        self.kept: list[Any] = []
        self.numel = int(mb_per_step * 2**20 / 4)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        ballast = torch.ones(self.numel)  # written, so every page is resident
        self.kept.append((outputs, ballast))


class NaNImagesOnRank(L.Callback):
    """Turns the training images of one rank's chosen batch into NaN (a NaN loss there only).

    Args:
        rank: The global rank whose batch is poisoned.
        batch: The training batch index (of epoch 0).
    """

    def __init__(self, rank: int, batch: int) -> None:
        self.rank = int(rank)
        self.batch = int(batch)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_rank != self.rank or batch_idx != self.batch or trainer.current_epoch:
            return
        for images in [batch.get("image"), *(batch.get("views") or [])]:
            if isinstance(images, torch.Tensor):
                images.mul_(float("nan"))
