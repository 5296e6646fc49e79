"""Counts and lists the samples skipped under ``data.on_bad_sample=skip``. Never silent."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L

log = logging.getLogger(__name__)


class BadSampleLog(L.Callback):
    """Appends every skipped sample to ``RUN/bad_samples.txt`` and logs the running count.

    The datasets replace an unreadable sample by a description; the collate function moves
    those descriptions to ``batch["bad_samples"]``. This callback is where they surface.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.count = 0

    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any) -> None:
        bad = batch.get("bad_samples") if isinstance(batch, dict) else None
        if not bad:
            return
        self.count += len(bad)
        # Every rank writes what it met; appends of short lines do not interleave.
        with self.path.open("a") as handle:
            for line in bad:
                handle.write(f"epoch {trainer.current_epoch} rank {trainer.global_rank}: {line}\n")
        for line in bad:
            log.warning("skipped bad sample: %s", line)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._record(trainer, pl_module, batch)

    def on_validation_batch_start(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._record(trainer, pl_module, batch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.log("data/bad_samples", float(self.count), reduce_fx="sum", sync_dist=True)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.count = int(state_dict.get("count", 0))
