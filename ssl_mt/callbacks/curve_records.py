"""Per-image validation losses of every epoch: what the curve statistics resample.

The claims "faster", "smoother" and "handles the resolution change better" are statements
about the validation-loss curves. For an interval over images, the statistics
(:mod:`ssl_mt.compare.claims`) need each image's loss at each epoch, not only the logged mean.
:class:`CurveRecords` takes them from the validation steps themselves (no second pass):

``RUN/eval/curves/val_<size>/epoch<EEE>.csv.gz``, columns ``image, task, loss``, one row per
(image, task) the image is labeled for: the same per-image ``loss`` as the evaluation records
(:mod:`ssl_mt.evaluation.records`), at the end of every validated epoch.

Nothing grows with epochs: an epoch's rows are written at its end and dropped. Under DDP every
rank gathers its rows (a padded ``all_gather`` after one of the row counts, on every rank
and for every size, whatever its shard held) and global rank 0 writes them; an image that
a sampler repeated is kept once. ``max_images`` keeps a fixed subset of the val images
(the same in every run: the first by a hash of the file name), so the files stay small on a
30k-image val set.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ssl_mt.evaluation.evaluate import image_name
from ssl_mt.evaluation.records import write_records
from ssl_mt.models.collectives import gather_rows

CURVES_DIR = "curves"
CURVE_COLUMNS = ("image", "task", "loss")


def curve_path(folder: str | Path, size: int, epoch: int, split: str = "val") -> Path:
    return Path(folder) / f"{split}_{size}" / f"epoch{epoch:03d}.csv.gz"


def kept_images(names: Sequence[str], max_images: int | None) -> np.ndarray:
    """Indices of the images kept: all, or the ``max_images`` first by a hash of the name
    (the same subset in every run of the same data, whatever their order)."""
    if max_images is None or max_images >= len(names):
        return np.arange(len(names))
    keys = [hashlib.sha1(name.encode("utf-8")).hexdigest() for name in names]
    return np.sort(np.argsort(keys, kind="stable")[:max_images])


class CurveRecords(L.Callback):
    """Writes every validated epoch's per-image losses (see the module docstring).

    Args:
        dirpath: ``RUN/eval/curves``.
        enabled: False: records nothing (the same on every rank: no collective either).
        max_images: Keep at most this many val images (None: all).
    """

    def __init__(
        self, dirpath: str | Path, enabled: bool = True, max_images: int | None = None
    ) -> None:
        if max_images is not None and max_images < 1:
            raise ValueError(f"curve_records.max_images must be >= 1 or null, got {max_images}")
        self.enabled = bool(enabled)
        self.dirpath = Path(dirpath)
        self.max_images = max_images
        self._rows: dict[int, list[Tensor]] = defaultdict(list)
        self._kept: Tensor | None = None
        self._image_names: list[str] = []

    def _names(self, trainer: L.Trainer) -> list[str]:
        datamodule = trainer.datamodule
        return [image_name(s, Path(datamodule.root)) for s in datamodule.samples["val"]]

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows.clear()
        if self.enabled and self._kept is None and not trainer.sanity_checking:
            self._image_names = self._names(trainer)  # the val split is fixed for the run
            kept = np.zeros(len(self._image_names), dtype=bool)
            kept[kept_images(self._image_names, self.max_images)] = True
            self._kept = torch.from_numpy(kept)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self.enabled or trainer.sanity_checking or not isinstance(outputs, Mapping):
            return
        index = torch.as_tensor(outputs["index"]).reshape(-1).cpu()
        keep = self._kept[index]
        for task_id, task in enumerate(pl_module.tasks):
            present = torch.as_tensor(outputs["present"][task.name]).reshape(-1).bool().cpu()
            chosen = present & keep
            if not chosen.any():
                continue
            losses = outputs["losses"][task.name].detach().reshape(-1).double().cpu()
            rows = torch.stack(
                [
                    index[chosen].double(),
                    torch.full((int(chosen.sum()),), float(task_id), dtype=torch.float64),
                    losses[chosen],
                ],
                dim=1,
            )
            self._rows[dataloader_idx].append(rows)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or trainer.sanity_checking:
            return
        names = self._image_names
        tasks = [t.name for t in pl_module.tasks]
        # The same collectives on every rank: one gather per size, in the sizes' order.
        for k, size in enumerate(pl_module.eval_sizes):
            parts = self._rows.get(k, [])
            rows = torch.cat(parts) if parts else torch.zeros((0, 3), dtype=torch.float64)
            rows = gather_rows(rows.to(pl_module.device)).cpu().numpy()
            if trainer.global_rank == 0:
                self._write(rows, names, tasks, int(size), trainer.current_epoch)
        self._rows.clear()

    def _write(
        self, rows: np.ndarray, names: Sequence[str], tasks: Sequence[str], size: int, epoch: int
    ) -> None:
        table = pd.DataFrame(
            {
                "image": [names[int(i)] for i in rows[:, 0]],
                "task": [tasks[int(t)] for t in rows[:, 1]],
                "loss": rows[:, 2],
            },
            columns=list(CURVE_COLUMNS),
        )
        table = table.drop_duplicates(["image", "task"]).sort_values(["task", "image"])
        write_records(table.reset_index(drop=True), curve_path(self.dirpath, size, epoch))
