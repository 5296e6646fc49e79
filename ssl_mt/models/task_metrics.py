"""torchmetrics collections per task, updated with labeled samples only.

Segmentation: IoU (Jaccard) and Dice over every labeled pixel of the epoch (Dice equals the
pixel-level F1). Classification: top-1, top-5 (only with more than 5 classes) and macro F1.
States are reset every epoch and reduced across DDP ranks by torchmetrics.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import (
    BinaryF1Score,
    BinaryJaccardIndex,
    MulticlassAccuracy,
    MulticlassF1Score,
)

from ssl_mt.tasks import TaskSpec


def step_mean() -> MeanMetric:
    """An epoch mean updated every training step without a host-device synchronisation.

    torchmetrics' default NaN check reads a boolean from the device on every update;
    non-finite losses are the business of :class:`ssl_mt.models.nonfinite.NonFiniteGuard`.
    """
    return MeanMetric(nan_strategy="disable")


def task_metrics(task: TaskSpec) -> nn.ModuleDict:
    """The metrics of one task (``loss`` included), by name."""
    metrics: dict[str, Metric] = {"loss": MeanMetric()}
    if task.is_segmentation:
        if "iou" in task.metrics:
            metrics["iou"] = BinaryJaccardIndex()
        if "dice" in task.metrics:
            metrics["dice"] = BinaryF1Score()
    else:
        n = task.num_classes
        if "top1" in task.metrics:
            metrics["top1"] = MulticlassAccuracy(n, top_k=1, average="micro")
        if "top5" in task.metrics and n > 5:
            metrics["top5"] = MulticlassAccuracy(n, top_k=5, average="micro")
        if "f1" in task.metrics:
            metrics["f1"] = MulticlassF1Score(n, average="macro")
    return nn.ModuleDict(metrics)


def update_task_metrics(
    metrics: nn.ModuleDict,
    task: TaskSpec,
    logits: Tensor,
    target: Tensor,
    present: Tensor,
    loss: Tensor,
) -> None:
    """Updates one task's metrics with the labeled samples of a batch (validation only)."""
    count = present.sum()
    metrics["loss"].update(loss.detach(), weight=count)
    if not bool(count):
        return
    logits, target = logits[present].detach(), target[present]
    for name, metric in metrics.items():
        if name == "loss":
            continue
        if task.is_segmentation:
            metric.update(logits.float().sigmoid().flatten(), target.flatten().long())
        else:
            metric.update(logits.float(), target)
