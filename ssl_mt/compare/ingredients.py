"""Metrics as ratios of per-image sums: what a bootstrap replicate re-weights.

Every metric of :mod:`ssl_mt.evaluation.records` is a ratio of sums over images of per-image
*ingredients*: IoU = Σtp / Σ(tp + fp + fn), Dice = 2Σtp / (2Σtp + Σfp + Σfn), top-1 =
Σcorrect / Σ1, loss = Σloss / Σ1, macro F1 = the mean over classes of 2·Σtp_c / (2·Σtp_c +
Σfp_c + Σfn_c), the global loss = the sum over tasks of Σloss_t / Σcount_t. So a metric over
any weighting of the images (:mod:`ssl_mt.compare.statistics`) is one weighted sum of the
``(N, k)`` ingredient matrix followed by :func:`metric_value`.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ssl_mt.tasks import SEGMENTATION_METRICS

# The sum over tasks of each task's mean loss (the logged ``val/<size>/global/loss``).
GLOBAL_LOSS = "global_loss"


def ingredient_names(metric: str, num_classes: int = 0) -> list[str]:
    """The per-image columns a metric is computed from (in the order of :func:`metric_value`)."""
    if metric in SEGMENTATION_METRICS:
        return ["tp", "fp", "fn"]
    if metric == "loss":
        return ["loss", "count"]
    if metric == GLOBAL_LOSS:
        if num_classes < 1:
            raise ValueError("the global loss needs the number of tasks (num_classes)")
        return [f"{part}{t}" for t in range(num_classes) for part in ("loss", "count")]
    if metric == "top1":
        return ["correct", "count"]
    if metric == "top5":
        return ["top5", "count"]
    if metric == "f1":
        if num_classes < 1:
            raise ValueError("macro F1 needs the number of classes")
        return [f"{part}{c}" for part in ("tp", "fp", "fn") for c in range(num_classes)]
    raise ValueError(f"unknown metric {metric!r}")


def metric_value(metric: str, sums: np.ndarray) -> np.ndarray:
    """A metric from ingredient sums ``(..., k)`` (columns of :func:`ingredient_names`).

    Zero denominators give 0, as torchmetrics does; macro F1 averages over the classes that
    occur as a target or a prediction (torchmetrics' ``average="macro"``).
    """
    sums = np.asarray(sums, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        if metric in SEGMENTATION_METRICS:
            tp, fp, fn = sums[..., 0], sums[..., 1], sums[..., 2]
            numerator, denominator = (
                (tp, tp + fp + fn) if metric == "iou" else (2 * tp, 2 * tp + fp + fn)
            )
            return np.where(denominator > 0, numerator / denominator, 0.0)
        if metric in ("loss", "top1", "top5"):
            count = sums[..., 1]
            return np.where(count > 0, sums[..., 0] / count, math.nan if metric == "loss" else 0.0)
        if metric == GLOBAL_LOSS:
            pairs = sums.reshape(*sums.shape[:-1], -1, 2)
            return (pairs[..., 0] / pairs[..., 1]).sum(axis=-1)
        if metric == "f1":
            tp, fp, fn = np.split(sums, 3, axis=-1)
            support = tp + fp + fn
            f1 = np.where(support > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
            classes = (support > 0).sum(axis=-1)
            return np.where(classes > 0, f1.sum(axis=-1) / np.maximum(classes, 1), 0.0)
    raise ValueError(f"unknown metric {metric!r}")


def ingredients(records: pd.DataFrame, metric: str, num_classes: int = 0) -> np.ndarray:
    """The per-image ingredients ``(N, k)`` of a metric from one task's records (row order).

    Args:
        records: Rows of :mod:`ssl_mt.evaluation.records` for one task.
        metric: The metric (``iou``, ``dice``, ``loss``, ``top1``, ``top5``, ``f1``).
        num_classes: Classes of the task (macro F1 only): at least 1 + the largest index.
    """
    n = len(records)
    ones = np.ones(n)

    def column(name: str) -> np.ndarray:
        values = records[name].to_numpy(dtype=float, na_value=np.nan)
        if np.isnan(values).any():
            raise ValueError(f"records without {name!r} for metric {metric!r}")
        return values

    if metric in SEGMENTATION_METRICS:
        return np.stack([column("tp"), column("fp"), column("fn")], axis=1)
    if metric == "loss":
        return np.stack([column("loss"), ones], axis=1)
    if metric == "top1":
        return np.stack([(column("target") == column("pred")).astype(float), ones], axis=1)
    if metric == "top5":
        return np.stack([column("top5"), ones], axis=1)
    if metric == "f1":
        target, pred = column("target").astype(int), column("pred").astype(int)
        if num_classes <= max(target.max(initial=0), pred.max(initial=0)):
            raise ValueError(f"num_classes={num_classes} but the records hold a larger index")
        classes = np.arange(num_classes)
        is_target = target[:, None] == classes
        is_pred = pred[:, None] == classes
        return np.concatenate(
            [is_target & is_pred, is_pred & ~is_target, is_target & ~is_pred], axis=1
        ).astype(float)
    raise ValueError(f"unknown metric {metric!r}")


def metric_from_records(records: pd.DataFrame, metric: str, num_classes: int = 0) -> float:
    """A metric over all records of one task, as the run logs it."""
    return float(metric_value(metric, ingredients(records, metric, num_classes).sum(axis=0)))
