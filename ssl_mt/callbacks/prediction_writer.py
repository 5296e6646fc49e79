"""Writes what ``python -m ssl_mt.predict`` predicts, batch by batch: masks at original
size, the probabilities csv, overlays, and the metrics on labeled images."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BasePredictionWriter

from ssl_mt.callbacks.predictions import overlay
from ssl_mt.data.image_io import read_image, write_png
from ssl_mt.data.predict_dataset import PredictInput
from ssl_mt.models.task_metrics import task_metrics
from ssl_mt.tasks import TaskSpec

THRESHOLD = 0.5  # foreground when the sigmoid probability exceeds it (the metrics' default)


def csv_header(tasks: Sequence[TaskSpec]) -> list[str]:
    header = ["image"]
    for task in tasks:
        if not task.is_segmentation:
            header += [task.name, *(f"{task.name}/p_{c}" for c in task.classes)]
    return header


class PredictionWriter(BasePredictionWriter):
    """Writes each batch's masks, csv rows and overlays as it comes (nothing is kept), and
    updates the metrics on labeled images."""

    def __init__(
        self,
        inputs: PredictInput,
        tasks: Sequence[TaskSpec],
        out: Path,
        overlays: bool = False,
        metrics: bool = False,
    ) -> None:
        super().__init__(write_interval="batch")
        self.inputs, self.tasks, self.out = inputs, list(tasks), out
        self.overlays = overlays
        self.metrics = {t.name: task_metrics(t) for t in self.tasks} if metrics else None
        self.labeled = {t.name: 0 for t in self.tasks}
        self._file = None
        self._csv = None
        self.rows = 0

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self._file = (self.out / "predictions.csv").open("w", newline="")
        self._csv = csv.writer(self._file)
        self._csv.writerow(csv_header(self.tasks))

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._file is not None:
            self._file.close()

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Mapping[str, torch.Tensor],
        batch_indices: Sequence[int] | None,
        batch: Mapping[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        prediction = {name: value.detach().float().cpu() for name, value in prediction.items()}
        for j, index in enumerate(batch["index"].tolist()):
            relative = self.inputs.relative(index)
            height, width = (int(v) for v in batch["hw"][j])
            row: list[Any] = [relative.as_posix()]
            masks, lines = [], []
            for task in self.tasks:
                logits = prediction[task.name][j]
                if task.is_segmentation:
                    probability = F.interpolate(
                        logits[None], size=(height, width), mode="bilinear", align_corners=False
                    )[0, 0].sigmoid()
                    mask = (probability > THRESHOLD).numpy().astype(np.uint8) * 255
                    write_png(self.out / "masks" / task.name / relative.with_suffix(".png"), mask)
                    masks.append(mask)
                    self._update(task, batch, j, probability)
                else:
                    probabilities = logits.softmax(dim=0)
                    label = task.classes[int(probabilities.argmax())]
                    row += [label, *(f"{float(p):.6f}" for p in probabilities)]
                    lines.append(f"{task.name}: {label} ({float(probabilities.max()):.2f})")
                    self._update(task, batch, j, logits)
            self._csv.writerow(row)
            self.rows += 1
            if self.overlays:
                image = read_image(self.inputs.images[index])
                picture = overlay(image, masks)
                scale = max(0.3, min(height, width) / 700)  # text readable on 0.3-12 MP photos
                step = int(30 * scale) + 4
                for k, line in enumerate(lines):
                    origin = (4, step * (k + 1))
                    for colour, thick in (((0, 0, 0), 3), ((255, 255, 255), 1)):
                        cv2.putText(
                            picture,
                            line,
                            origin,
                            cv2.FONT_HERSHEY_SIMPLEX,
                            scale,
                            colour,
                            max(1, int(thick * scale * 2)),
                        )
                write_png(self.out / "overlays" / relative.with_suffix(".png"), picture)
        self._file.flush()

    def _update(self, task: TaskSpec, batch: Mapping[str, Any], j: int, value: torch.Tensor):
        if self.metrics is None or not batch[f"present/{task.name}"][j]:
            return
        target = batch[f"target/{task.name}"][j]
        self.labeled[task.name] += 1
        for name, metric in self.metrics[task.name].items():
            if name == "loss":
                continue  # predict reports quality, not the training objective
            if task.is_segmentation:
                metric.update(value.flatten(), target.flatten().long())
            else:
                metric.update(value[None], torch.tensor([int(target)]))

    def results(self) -> dict[str, dict[str, float]]:
        """Per task: each metric over its labeled images, and how many there were."""
        out: dict[str, dict[str, float]] = {}
        for task in self.tasks:
            entry: dict[str, float] = {"labeled": self.labeled[task.name]}
            if self.labeled[task.name]:
                for name, metric in self.metrics[task.name].items():
                    if name != "loss":
                        entry[name] = float(metric.compute())
            out[task.name] = entry
        return out
