"""Images per second, in the progress bar and the epoch logs, without synchronising the GPU."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch


def batch_images(batch: Mapping[str, Any]) -> int:
    """Images in a batch: every view of an SSL batch, or the images of a multi-task batch."""
    if "views" in batch:
        return sum(int(v.shape[0]) for v in batch["views"])
    image = batch.get("image")
    return int(image.shape[0]) if isinstance(image, torch.Tensor) else 0


class ThroughputMonitor(L.Callback):
    """Logs ``train/images_per_s`` per epoch and shows a running value in the progress bar.

    Wall-clock time between batches, so data waiting counts against throughput, which is
    what a user sizing a run needs. No ``cuda.synchronize``: over an epoch the asynchronous
    queue evens out.

    Args:
        window: Batches between two progress-bar updates.
    """

    def __init__(self, window: int = 20) -> None:
        self.window = window
        self._epoch_start = 0.0
        self._epoch_images = 0
        self._window_start = 0.0
        self._window_images = 0
        self.current = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = self._window_start = time.perf_counter()
        self._epoch_images = self._window_images = 0

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        n = batch_images(batch) * trainer.world_size
        self._epoch_images += n
        self._window_images += n
        if (batch_idx + 1) % self.window == 0:
            now = time.perf_counter()
            self.current = self._window_images / max(now - self._window_start, 1e-9)
            self._window_start, self._window_images = now, 0
        if self.current:
            pl_module.log("img/s", self.current, prog_bar=True, logger=False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        elapsed = max(time.perf_counter() - self._epoch_start, 1e-9)
        pl_module.log("train/images_per_s", self._epoch_images / elapsed, rank_zero_only=True)
        pl_module.log("train/epoch_time_s", elapsed, rank_zero_only=True)
