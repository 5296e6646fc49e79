"""Host and device memory per epoch: what the reference run's OOM at epoch 200 lacked.

Logs ``sys/rss_mb`` (resident memory of the training process AND its data workers),
``sys/gpu_allocated_mb`` and ``sys/gpu_peak_mb`` (peak within the epoch) every epoch, so
growth shows up in metrics.csv long before it kills a run.
"""

from __future__ import annotations

import lightning as L
import psutil
import torch


def process_tree_rss_mb(pid: int | None = None) -> float:
    """Resident memory of a process and all its descendants, in MiB."""
    root = psutil.Process(pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total / 2**20


class MemoryMonitor(L.Callback):
    """Logs process-tree RSS and CUDA memory at the end of every training epoch."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.log("sys/rss_mb", process_tree_rss_mb(), rank_zero_only=True)
        if pl_module.device.type == "cuda":
            pl_module.log(
                "sys/gpu_allocated_mb", torch.cuda.memory_allocated(pl_module.device) / 2**20
            )
            pl_module.log(
                "sys/gpu_peak_mb", torch.cuda.max_memory_allocated(pl_module.device) / 2**20
            )
