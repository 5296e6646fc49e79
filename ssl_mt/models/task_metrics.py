"""torchmetrics collections per task, updated with labeled samples only.

Segmentation: IoU (Jaccard) and Dice over every labeled pixel of the epoch (Dice equals the
pixel-level F1). Classification: top-1, top-5 (only with more than 5 classes) and macro F1.
The loss is the mean of the per-sample losses over the labeled samples of the split.
States are reset every epoch and reduced across DDP ranks by torchmetrics.

torchmetrics' ``compute()`` is a collective under DDP (it syncs the states), also on a rank
that never called ``update()`` (its states are the defaults: zeros, which sum correctly). So
every rank must call it, for the same metrics in the same order: :func:`labeled_counts`
agrees on which tasks have labels anywhere, :func:`log_task_metrics` computes exactly those.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
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
    """The metrics of one task (``loss`` included), by name.

    Without torchmetrics' argument validation (``validate_args=False``): it scans every
    target value of every batch (a sixth of a CPU validation step at 96 px), and the targets
    are checked where they are read: masks are binarised (:mod:`ssl_mt.data.image_io`), a
    class outside the task's is refused (:meth:`ssl_mt.tasks.TaskSpec.class_index`).
    """
    metrics: dict[str, Metric] = {"loss": MeanMetric()}
    if task.is_segmentation:
        if "iou" in task.metrics:
            metrics["iou"] = BinaryJaccardIndex(validate_args=False)
        if "dice" in task.metrics:
            metrics["dice"] = BinaryF1Score(validate_args=False)
    else:
        n = task.num_classes
        if "top1" in task.metrics:
            metrics["top1"] = MulticlassAccuracy(n, top_k=1, average="micro", validate_args=False)
        if "top5" in task.metrics and n > 5:
            metrics["top5"] = MulticlassAccuracy(n, top_k=5, average="micro", validate_args=False)
        if "f1" in task.metrics:
            metrics["f1"] = MulticlassF1Score(n, average="macro", validate_args=False)
    return nn.ModuleDict(metrics)


def update_task_metrics(
    metrics: nn.ModuleDict,
    task: TaskSpec,
    logits: Tensor,
    target: Tensor,
    present: Tensor,
    per_sample_loss: Tensor,
) -> None:
    """Updates one task's metrics with the labeled samples of a batch (validation only).

    ``per_sample_loss`` (N,): the task's loss of every sample, labeled or not.
    """
    flags = present.to(torch.bool)
    loss = torch.where(flags, per_sample_loss.detach().float(), 0.0)
    metrics["loss"].update(loss, weight=flags.float())
    if not bool(flags.any()):
        return
    logits, target = logits[flags].detach(), target[flags]
    for name, metric in metrics.items():
        if name == "loss":
            continue
        if task.is_segmentation:
            metric.update(logits.float().sigmoid().flatten(), target.flatten().long())
        else:
            metric.update(logits.float(), target)


def labeled_counts(per_size: Sequence[Mapping[str, nn.ModuleDict]]) -> Tensor:
    """(sizes, tasks) labeled samples seen by every rank together: one ``all_reduce``.

    Read from each task's loss metric (a ``MeanMetric`` whose weights are the labeled flags,
    so its ``weight`` state is this rank's labeled count).
    """
    local = torch.stack(
        [torch.stack([m["loss"].weight.float() for m in tasks.values()]) for tasks in per_size]
    )
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(local, op=dist.ReduceOp.SUM)
    return local


def log_task_metrics(
    per_task: Mapping[str, nn.ModuleDict], present: Mapping[str, bool]
) -> dict[str, Tensor]:
    """``{"task/metric": value}`` of the tasks labeled somewhere; every metric is reset.

    ``present`` must be the same on every rank (from :func:`labeled_counts`): each computed
    metric syncs its states over the ranks.
    """
    values: dict[str, Tensor] = {}
    for task, metrics in per_task.items():
        for name, metric in metrics.items():
            if present[task]:
                with warnings.catch_warnings():
                    # A rank whose shard held no label of the task joins the sync with its
                    # default states; torchmetrics' "compute before update" warning is moot.
                    warnings.filterwarnings("ignore", message=".*was called before the ``update``")
                    values[f"{task}/{name}"] = metric.compute()
            metric.reset()
    return values
