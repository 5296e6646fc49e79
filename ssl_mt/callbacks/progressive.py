"""Progressive resolution: logs the stage of every epoch and announces each switch.

The datamodules pick the loader of the current stage themselves (the trainer reloads
dataloaders every epoch and gets the same loader back within a stage), and the lr schedule
knows the stages from the start; this callback makes the switch visible: ``train/size``,
``train/batch_size`` and ``train/stage`` per epoch, so plots can mark it.
"""

from __future__ import annotations

import logging

import lightning as L
import torch

log = logging.getLogger(__name__)


class ProgressiveResolution(L.Callback):
    """Logs the training stage of each epoch (the schedule lives in the datamodule)."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        schedule = trainer.datamodule.schedule
        epoch = trainer.current_epoch
        index = schedule.index_at(epoch)
        stage = schedule.stages[index]
        if epoch == schedule.starts[index] and index > 0 and pl_module.device.type == "cuda":
            # The previous size's cached blocks do not fit the new shapes: hand them back
            # rather than let the allocator keep both sets.
            torch.cuda.empty_cache()
        if epoch == schedule.starts[index] and (index > 0 or epoch == 0):
            log.info(
                "epoch %d: stage %d/%d, %d px, batch %d per device, aug strength %.2f",
                epoch,
                index + 1,
                len(schedule.stages),
                stage.size,
                stage.batch_size,
                stage.aug_strength,
            )
        pl_module.log("train/size", float(stage.size), on_step=False, on_epoch=True)
        pl_module.log("train/batch_size", float(stage.batch_size), on_step=False, on_epoch=True)
        pl_module.log("train/stage", float(index), on_step=False, on_epoch=True)
