"""PNG grids of predictions each validation epoch: masks overlaid, predicted vs true labels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor

from ssl_mt.data.image_io import write_png

_COLOURS = [(255, 64, 64), (64, 160, 255), (255, 200, 0), (0, 220, 120)]


def denormalize(images: Tensor, mean: Any, std: Any) -> np.ndarray:
    """(N, 3, H, W) normalised tensors → (N, H, W, 3) uint8."""
    mean_t = torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1)
    pixels = (images.detach().float().cpu() * std_t + mean_t).clamp(0, 1) * 255
    return pixels.permute(0, 2, 3, 1).round().to(torch.uint8).numpy()


def overlay(image: np.ndarray, masks: list[np.ndarray], alpha: float = 0.45) -> np.ndarray:
    out = image.astype(np.float32)
    for k, mask in enumerate(masks):
        colour = np.array(_COLOURS[k % len(_COLOURS)], np.float32)
        on = mask > 0
        out[on] = (1 - alpha) * out[on] + alpha * colour
    return out.round().astype(np.uint8)


def prediction_tile(
    image: np.ndarray,
    predicted_masks: list[np.ndarray],
    true_masks: list[np.ndarray | None],
    lines: list[str],
) -> np.ndarray:
    """[image with true masks | image with predicted masks] and a caption band below."""
    import cv2

    h, w = image.shape[:2]
    truth = overlay(image, [m for m in true_masks if m is not None])
    pred = overlay(image, predicted_masks)
    band_h = 12 * max(1, len(lines)) + 6
    scale = max(1, 192 // w)
    tile = np.concatenate([truth, pred], axis=1)
    tile = cv2.resize(tile, (tile.shape[1] * scale, h * scale), interpolation=cv2.INTER_NEAREST)
    band = np.full((band_h, tile.shape[1], 3), 255, np.uint8)
    for i, line in enumerate(lines):
        cv2.putText(
            band, line, (3, 12 * (i + 1)), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1, cv2.LINE_AA
        )
    return np.concatenate([tile, band], axis=0)


def grid(tiles: list[np.ndarray], columns: int = 4) -> np.ndarray:
    h = max(t.shape[0] for t in tiles)
    w = max(t.shape[1] for t in tiles)
    rows = (len(tiles) + columns - 1) // columns
    canvas = np.full((rows * (h + 4), columns * (w + 4), 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        canvas[
            r * (h + 4) : r * (h + 4) + tile.shape[0], c * (w + 4) : c * (w + 4) + tile.shape[1]
        ] = tile
    return canvas


class PredictionGrid(L.Callback):
    """Writes ``RUN/predictions/epochEEE_SIZE.png`` (and a TensorBoard image) per eval size.

    Drawn from the first validation batch of each resolution: left half true masks,
    right half predicted masks, captions ``task: predicted / true``.

    Args:
        dirpath: Output folder.
        num_samples: Tiles per grid.
        every_n_epochs: Draw every N validation epochs.
    """

    def __init__(self, dirpath: str | Path, num_samples: int = 8, every_n_epochs: int = 1) -> None:
        self.dirpath = Path(dirpath)
        self.num_samples = num_samples
        self.every_n_epochs = every_n_epochs

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx != 0 or not trainer.is_global_zero or trainer.sanity_checking:
            return
        if trainer.current_epoch % self.every_n_epochs or "image" not in batch:
            return
        n = min(self.num_samples, batch["image"].shape[0])
        images = batch["image"][:n]
        with torch.no_grad():
            outputs = pl_module(images)
        augment = trainer.datamodule.augment
        pixels = denormalize(images, augment["mean"], augment["std"])
        tiles = []
        for i in range(n):
            predicted, truth, lines = [], [], []
            for task in pl_module.tasks:
                present = bool(batch["present"][task.name][i])
                if task.is_segmentation:
                    predicted.append((outputs[task.name][i, 0] > 0).cpu().numpy())
                    truth.append(
                        batch["target"][task.name][i, 0].cpu().numpy() if present else None
                    )
                else:
                    guess = task.classes[int(outputs[task.name][i].argmax())]
                    actual = task.classes[int(batch["target"][task.name][i])] if present else "-"
                    lines.append(f"{task.name}: {guess} / {actual}")
            tiles.append(prediction_tile(pixels[i], predicted, truth, lines))
        size = pl_module.eval_sizes[dataloader_idx]
        picture = grid(tiles)
        write_png(self.dirpath / f"epoch{trainer.current_epoch:03d}_{size}.png", picture)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image(
                    f"predictions/{size}", picture, trainer.current_epoch, dataformats="HWC"
                )
