"""The keys of logged metrics, and the order in which sizes, tasks and metrics are listed.

Validation metrics are logged as ``val/<size>/<task>/<metric>``; the task ``global`` (the
summed loss) comes after the tasks, and the scores come in :data:`METRIC_ORDER`, then any
other metric, then the loss.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ssl_mt.compare.run import Run

GLOBAL = "global"
LOSS = "loss"
# Row order of the tables: the scores in this order, then any other metric, then the loss.
METRIC_ORDER = ("iou", "dice", "top1", "top5", "f1")
# How tables and figures name a metric (any other: its key).
METRIC_LABELS = {
    "iou": "IoU",
    "dice": "Dice",
    "top1": "top-1",
    "top5": "top-5",
    "f1": "F1",
    "loss": "loss",
    "jump": "jump",
    "auc": "AUC",
    "epochs_to_reach": "epochs to reach",
    "roughness": "roughness",
}
# The statistics of the val-loss curves (:mod:`ssl_mt.compare.claims`), all lower is better,
# and the values each can take.
JUMP, AUC, REACH, ROUGHNESS = "jump", "auc", "epochs_to_reach", "roughness"
CLAIM_RANGES = {
    JUMP: (-math.inf, math.inf),
    AUC: (0.0, math.inf),
    REACH: (0.0, math.inf),
    ROUGHNESS: (0.0, math.inf),
}


def val_key(size: int | str, task: str, metric: str) -> str:
    return f"val/{size}/{task}/{metric}"


def parse_val_key(key: str) -> tuple[int | str, str, str]:
    """``val/224/skin/iou`` -> ``(224, "skin", "iou")``."""
    parts = key.split("/")
    if len(parts) != 4 or parts[0] != "val":
        raise ValueError(f"not a per-resolution validation key: {key!r}")
    size = int(parts[1]) if parts[1].isdigit() else parts[1]
    return size, parts[2], parts[3]


def _is_val_key(key: str) -> bool:
    try:
        parse_val_key(key)
    except ValueError:
        return False
    return True


def _select(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _size_key(size: int | str) -> tuple[int, int | str]:
    return (0, size) if isinstance(size, int) else (1, str(size))


def _sorted_sizes(sizes: Iterable[int | str]) -> list[int | str]:
    return sorted(set(sizes), key=_size_key)


def _metric_rank(metric: str) -> tuple[int, str]:
    if metric in METRIC_ORDER:
        return (METRIC_ORDER.index(metric), metric)
    if metric == LOSS:
        return (len(METRIC_ORDER) + 1, metric)
    return (len(METRIC_ORDER), metric)


def _order_tasks(tasks: Iterable[str], config: Mapping[str, Any] | None = None) -> list[str]:
    tasks = set(tasks)
    declared = _select(config or {}, "tasks")
    order = [t for t in (declared or {}) if t in tasks and t != GLOBAL]
    order += sorted(tasks - set(order) - {GLOBAL})
    return order + ([GLOBAL] if GLOBAL in tasks else [])


def _all_tasks(runs: Sequence[Run], keys: Iterable[str]) -> list[str]:
    config = runs[0].config if runs else {}
    return _order_tasks(keys, config)
