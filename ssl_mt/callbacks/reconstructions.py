"""A picture per epoch of masked image modelling: original / masked input / reconstruction.

Written to ``RUN/reconstructions/epochEEE.png`` and, when a TensorBoard logger is on, as the
image ``mim/reconstructions``. The same first training images (with their epoch-0 crops and
masks) every epoch, so pictures of different epochs differ only by the model.

With per-patch normalised targets (``norm_pix``) the prediction carries no patch mean or
contrast; the reconstruction column shows it with the mean and standard deviation of the
original patch (one number each, over the patch's pixels and channels together, as MAE's
normalisation): brightness and contrast are the original's, colour and structure the
model's. A model that has learned nothing yet shows flat grey patches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import lightning as L
import numpy as np
import torch
from torch import Tensor

from ssl_mt.callbacks.predictions import denormalize, grid
from ssl_mt.data.datasets import BAD_SAMPLE_KEY
from ssl_mt.data.image_io import write_png

_PICTURE_EPOCH = 0  # the crops and masks shown: those of epoch 0, every epoch


def unnormalize_patches(prediction: Tensor, images: Tensor, patch_size: int, eps: float = 1e-6):
    """Inverse of :func:`ssl_mt.losses.mim_loss.normalize_patches` with ``images``' statistics."""
    b, c, h, w = images.shape
    gh, gw = h // patch_size, w // patch_size
    patches = images.float().reshape(b, c, gh, patch_size, gw, patch_size)
    mean = patches.mean(dim=(1, 3, 5), keepdim=True)
    std = (patches.var(dim=(1, 3, 5), keepdim=True) + eps).sqrt()
    pred = prediction.float().reshape(b, c, gh, patch_size, gw, patch_size)
    return (pred * std + mean).reshape(b, c, h, w)


def _caption(width: int, text: str) -> np.ndarray:
    band = np.full((16, width, 3), 255, np.uint8)
    cv2.putText(band, text, (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return band


class ReconstructionGrid(L.Callback):
    """Draws a few training images through a MIM module at the end of every N-th epoch.

    Args:
        num_samples: Images in the picture (the first ones of the training set).
        every_n_epochs: Draw every N epochs.
        dirpath: Output folder; default ``<trainer.default_root_dir>/reconstructions``.
    """

    def __init__(
        self, num_samples: int = 6, every_n_epochs: int = 1, dirpath: str | Path | None = None
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"method.reconstructions.num_samples must be >= 1, got {num_samples}")
        self.num_samples = int(num_samples)
        self.every_n_epochs = max(1, int(every_n_epochs))
        self.dirpath = Path(dirpath) if dirpath is not None else None

    def images(self, trainer: L.Trainer) -> tuple[Tensor, Tensor]:
        """The first ``num_samples`` loadable training images of this epoch's stage."""
        datamodule = trainer.datamodule
        dataset = datamodule.train_dataset(datamodule.schedule.index_at(trainer.current_epoch))
        views, indices = [], []
        for index in range(len(dataset)):
            item = dataset[(_PICTURE_EPOCH, index)]
            if BAD_SAMPLE_KEY not in item:
                views.append(item["views"][0])
                indices.append(item["index"])
            if len(views) == self.num_samples:
                break
        return torch.stack(views), torch.tensor(indices)

    @torch.no_grad()
    def picture(self, trainer: L.Trainer, module: Any) -> np.ndarray:
        images, indices = self.images(trainer)
        images = images.to(module.device)
        mask = module.masks(indices, _PICTURE_EPOCH, images.shape[-2], images.shape[-1])
        mask = mask.to(module.device)
        was_training = module.training
        module.eval()
        try:
            masked, prediction, _ = module.reconstruct(images, mask)
        finally:
            module.train(was_training)
        if module.norm_pix:
            prediction = unnormalize_patches(prediction, images, module.patch_size)
        recon = torch.where(mask, prediction.to(images.dtype), images)
        augment = trainer.datamodule.augment
        columns = [denormalize(x, augment["mean"], augment["std"]) for x in (images, masked, recon)]
        side = images.shape[-1]
        scale = max(1, 128 // side)
        tiles = []
        for i in range(images.shape[0]):
            tile = np.concatenate([column[i] for column in columns], axis=1)
            tiles.append(
                cv2.resize(
                    tile,
                    (tile.shape[1] * scale, tile.shape[0] * scale),
                    interpolation=cv2.INTER_NEAREST,
                )
            )
        body = grid(tiles, columns=2)
        fill = module.mask_fill.fill
        text = (
            f"epoch {trainer.current_epoch}: original | masked ({fill}, "
            f"{module.mask_ratio:.0%} of {module.patch_size}px patches) | reconstruction"
        )
        return np.concatenate([_caption(body.shape[1], text), body], axis=0)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        picture = self.picture(trainer, pl_module)
        folder = self.dirpath or Path(trainer.default_root_dir) / "reconstructions"
        write_png(folder / f"epoch_{trainer.current_epoch:03d}.png", picture)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image(
                    "mim/reconstructions", picture, trainer.current_epoch, dataformats="HWC"
                )
