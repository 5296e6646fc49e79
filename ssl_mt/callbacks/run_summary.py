"""One block at the start of a run: where it writes, what it runs on, and on what data."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L

from ssl_mt.data.check import count_labels, label_table
from ssl_mt.data.manifest import SPLITS

log = logging.getLogger(__name__)


class RunSummary(L.Callback):
    """Logs, once on rank 0 when fitting starts, the run directory, the devices
    (accelerator × devices × nodes, precision), the global batch of every stage, the peak
    learning rates, the images per split and the labeled samples per task.

    Args:
        run_dir: The run directory shown first.
    """

    def __init__(self, run_dir: str) -> None:
        self.run_dir = str(run_dir)
        self.text = ""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self.text = summary_text(trainer, self.run_dir)
        log.info("run summary\n%s", self.text)


def summary_text(trainer: L.Trainer, run_dir: str) -> str:
    """The block :class:`RunSummary` logs, as text."""
    accelerator = type(trainer.accelerator).__name__.removesuffix("Accelerator").lower()
    accumulate = max(1, int(trainer.accumulate_grad_batches))
    lines = [
        f"run directory  {run_dir}",
        f"devices        {accelerator} × {trainer.num_devices} device(s) × "
        f"{trainer.num_nodes} node(s) = {trainer.world_size} process(es), "
        f"precision {trainer.precision}",
    ]
    datamodule = trainer.datamodule
    schedule = getattr(datamodule, "schedule", None)
    if schedule is not None:
        start = 0
        for i, stage in enumerate(schedule.stages):
            batch = stage.batch_size * trainer.world_size * accumulate
            last = start + stage.epochs - 1
            epochs = f"epoch {start}" if last == start else f"epochs {start}-{last}"
            label = "global batch   " if i == 0 else "               "
            lines.append(
                f"{label}{batch} = {stage.batch_size} per device × {trainer.world_size} × "
                f"{accumulate} accumulated ({stage.size} px, {epochs})"
            )
            start += stage.epochs
    lines.append(f"lr (peak)      {_peak_lrs(trainer)}")
    lines.extend(_data_lines(datamodule))
    return "\n".join(lines)


def _peak_lrs(trainer: L.Trainer) -> str:
    """Each parameter group tag's lr at its peak (before warmup and decay scale it)."""
    if not trainer.optimizers:
        return "no optimiser"
    optimizer = trainer.optimizers[0]
    peaks: dict[str, float] = {}
    for group in optimizer.param_groups:
        tag = group.get("tag") or "all"
        peaks.setdefault(tag, float(group.get("initial_lr", group["lr"])))
    name = type(optimizer).__name__
    return f"{name}: " + ", ".join(f"{tag} {lr:.3g}" for tag, lr in peaks.items())


def _data_lines(datamodule: Any) -> list[str]:
    root = getattr(datamodule, "root", "?")
    samples = getattr(datamodule, "samples", None)
    tasks = getattr(datamodule, "tasks", None)
    if samples and tasks is not None:  # fine-tuning: a manifest with labels per task
        every = [s for split in SPLITS for s in samples.get(split, [])]
        table = label_table(count_labels(every, tasks), {t.name: t.kind for t in tasks})
        return [
            f"data           {root}: images and labeled samples per split",
            *(f"  {line}" for line in table),
        ]
    images = getattr(datamodule, "images", None)
    if images is None:
        return []
    source = "labels.csv train split" if getattr(datamodule, "uses_manifest", False) else "folder"
    lines = [f"data           {root}: {len(images)} training images ({source})"]
    knn = getattr(datamodule, "knn_samples", {}) or {}
    knn_tasks = getattr(datamodule, "knn_tasks", [])
    if knn and knn_tasks:
        table = label_table(
            count_labels([s for part in knn.values() for s in part], knn_tasks),
            {t.name: t.kind for t in knn_tasks},
        )
        lines.append("kNN monitor    labeled samples (bank = train, queries = val)")
        lines.extend(f"  {line}" for line in table)
    return lines
