"""Per-image, per-task evaluation records of a fine-tuning run's checkpoints.

At the end of fit, the best and the last checkpoint are evaluated on the val split (and the
test split when there is one) at every evaluation size; each pass writes

``RUN/eval/<checkpoint>/<split>_<size>.csv.gz`` (``checkpoint`` = ``best`` | ``last``)

in long format: one row per (image, task) the image is labeled for, with the columns

- ``image``: the image's path as written in ``labels.csv`` (relative to the dataset root);
- ``task``: the task name; ``loss``: the task loss of the image (the loss's ``per_sample``);
- segmentation: ``tp, fp, fn, tn``, pixel counts at probability threshold 0.5 at the
  evaluation size (empty for classification);
- classification: ``target`` and ``pred`` (top-1 class index) and ``top5`` (1 when the target
  is among the 5 highest logits; only for tasks with more than 5 classes, else empty).

``RUN/eval/<checkpoint>/checkpoint.json`` names the checkpoint file, its epoch and step.
:mod:`ssl_mt.evaluation.evaluate` writes them. Every validation metric the run logs is a
ratio of sums of these columns over the images (:mod:`ssl_mt.compare.ingredients`), so two
runs can be compared image by image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

RECORDS_DIR = "eval"
CHECKPOINTS = ("best", "last")
CHECKPOINT_INFO = "checkpoint.json"
SEGMENTATION_COLUMNS = ("tp", "fp", "fn", "tn")
CLASSIFICATION_COLUMNS = ("target", "pred", "top5")
COLUMNS = ("image", "task", "loss", *SEGMENTATION_COLUMNS, *CLASSIFICATION_COLUMNS)
COUNT_COLUMNS = (*SEGMENTATION_COLUMNS, *CLASSIFICATION_COLUMNS)
THRESHOLD = 0.5  # the probability threshold of torchmetrics' binary IoU / F1
TOP_K = 5


class RecordsError(ValueError):
    """An evaluation records file cannot be used; the message names the file and row."""


def records_path(run_dir: str | Path, checkpoint: str, split: str, size: int) -> Path:
    return Path(run_dir) / RECORDS_DIR / checkpoint / f"{split}_{size}.csv.gz"


def as_records(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """The frames of :func:`batch_records` as one table with every column of the format."""
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)
    for name in COLUMNS:
        if name not in table.columns:
            table[name] = pd.NA
    table = table[list(COLUMNS)]
    for name in COUNT_COLUMNS:
        table[name] = table[name].astype("Int64")
    table["loss"] = table["loss"].astype(float)
    return table


def write_records(table: pd.DataFrame, path: Path) -> Path:
    """Writes a records table (gzip without a timestamp: the same records, the same bytes),
    through a temporary file renamed into place: a run killed mid-write leaves no torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    table.to_csv(partial, index=False, compression={"method": "gzip", "mtime": 0})
    os.replace(partial, path)
    return path


# -- reading ------------------------------------------------------------------------------------------
def read_records(path: str | Path) -> pd.DataFrame:
    """Reads and checks one records file.

    Raises:
        RecordsError: The file is missing or unreadable, a column is missing, or a cell is
            not a number where one is needed (naming the file, line and column).
    """
    path = Path(path)
    if not path.is_file():
        raise RecordsError(f"{path}: no such records file")
    try:
        table = pd.read_csv(path, dtype={"image": str, "task": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError, UnicodeDecodeError) as error:
        raise RecordsError(f"{path}: not a readable records file ({error})") from error
    missing = [c for c in ("image", "task", "loss") if c not in table.columns]
    if missing:
        raise RecordsError(f"{path}: missing column(s) {missing} (columns: {list(table.columns)})")
    for name in ("loss", *COUNT_COLUMNS):
        if name not in table.columns:
            table[name] = np.nan
        values = pd.to_numeric(table[name], errors="coerce")
        bad = values.isna() & table[name].notna()
        if bad.any():
            line = int(np.flatnonzero(bad.to_numpy())[0]) + 2
            raise RecordsError(f"{path}, line {line}, column {name}: not a number")
        table[name] = values
    lossless = table["loss"].isna()
    if lossless.any():
        line = int(np.flatnonzero(lossless.to_numpy())[0]) + 2
        raise RecordsError(f"{path}, line {line}: empty loss")
    duplicated = table.duplicated(["image", "task"])
    if duplicated.any():
        row = table[duplicated].iloc[0]
        raise RecordsError(f"{path}: image {row['image']!r} appears twice for task {row['task']!r}")
    return table
