"""A run's per-image evaluation records, and the tasks and metrics the statistics compare."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ssl_mt.compare.keys import LOSS, _order_tasks, _select
from ssl_mt.compare.run import CompareError
from ssl_mt.evaluation.records import RECORDS_DIR, RecordsError, read_records


def load_records(run_dir: Path, checkpoint: str, split: str) -> dict[int, pd.DataFrame]:
    """A run's evaluation records of one checkpoint and split, by eval size ({} when none).

    Raises:
        CompareError: A records file is unreadable (the message names it).
    """
    folder = Path(run_dir) / RECORDS_DIR / checkpoint
    records = {}
    for path in sorted(folder.glob(f"{split}_*.csv.gz")):
        size = path.name[len(split) + 1 : -len(".csv.gz")]
        if not size.isdigit():
            continue
        try:
            records[int(size)] = read_records(path)
        except RecordsError as error:
            raise CompareError(str(error)) from error
    return records


@dataclass(frozen=True)
class TaskInfo:
    """What the statistics need to know of a task.

    Attributes:
        name: Task name.
        kind: ``segmentation`` or ``classification``.
        metrics: Metrics to compare, the main one first, ``loss`` last.
        num_classes: Classes (classification; from the config, else the records).
    """

    name: str
    kind: str
    metrics: tuple[str, ...]
    num_classes: int = 0

    @property
    def main_metric(self) -> str:
        return self.metrics[0]


def task_infos(config: Mapping[str, Any], records: Iterable[pd.DataFrame]) -> list[TaskInfo]:
    """Tasks of the records, in the config's order, with the config's metrics when it has
    them (segmentation: IoU, Dice; classification: top-1, top-5 with > 5 classes, F1)."""
    tables = list(records)
    if not tables:
        return []
    table = pd.concat(tables, ignore_index=True)
    declared = _select(config, "tasks") or {}
    names = _order_tasks(set(table["task"]), config)
    infos = []
    for name in names:
        rows = table[table["task"] == name]
        spec = declared.get(name) if isinstance(declared, Mapping) else None
        segmentation = rows["tp"].notna().all()
        if segmentation:
            wanted = list((spec or {}).get("metrics") or ("iou", "dice"))
            infos.append(TaskInfo(name, "segmentation", (*wanted, LOSS)))
            continue
        classes = len((spec or {}).get("classes") or ())
        largest = int(max(rows["target"].max(), rows["pred"].max()))
        classes = max(classes, largest + 1)
        wanted = list((spec or {}).get("metrics") or ("top1", "top5", "f1"))
        if "top5" in wanted and (classes <= 5 or rows["top5"].isna().any()):
            wanted.remove("top5")
        infos.append(TaskInfo(name, "classification", (*wanted, LOSS), classes))
    return infos
