"""A CSV logger that appends on resume and never loses what it wrote.

Lightning's CSVLogger deletes an existing ``metrics.csv`` when it starts, buffers rows in
memory (100 steps by default) and rewrites the file in place when a new column appears; a
resumed run restarts its log, and a kill can drop or tear rows. This one keeps the file,
writes each batch of rows as soon as Lightning hands them over, and rewrites the header
through a temporary file and a rename.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

METRICS_FILE = "metrics.csv"


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def write_rows_atomically(path: Path, fieldnames: list[str], rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def truncate_after(path: str | Path, epoch: int, step: int) -> int:
    """Drops the rows a killed run logged after the checkpoint it will resume from.

    ``step`` is the checkpoint's ``global_step``: the optimiser steps done. Lightning logs a
    row at the number of steps done before it (a batch's row and its epoch's rows at
    ``global_step - 1``, the next epoch's first rows, e.g. the learning rate, at
    ``global_step``), so a row is kept when its epoch is at most ``epoch`` and its step
    below ``step``: a resumed run neither repeats nor loses rows. Returns the rows dropped.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    fieldnames, rows = read_rows(path)

    def keep(row: dict[str, str]) -> bool:
        row_epoch, row_step = row.get("epoch") or "", row.get("step") or ""
        if row_epoch and float(row_epoch) > epoch:
            return False
        return not (row_step and float(row_step) >= step)

    kept = [row for row in rows if keep(row)]
    if len(kept) != len(rows):
        write_rows_atomically(path, fieldnames, kept)
    return len(rows) - len(kept)


class _AppendingWriter(ExperimentWriter):
    def __init__(self, log_dir: str) -> None:
        # Deliberately not calling the parent's __init__: it deletes an existing metrics.csv.
        self.hparams: dict[str, Any] = {}
        self.metrics: list[dict[str, float]] = []
        self.metrics_keys: list[str] = []
        self.log_dir = log_dir
        self._fs = get_filesystem(log_dir)
        self.metrics_file_path = os.path.join(log_dir, METRICS_FILE)
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        path = Path(self.metrics_file_path)
        if path.is_file():
            self.metrics_keys = read_rows(path)[0]

    def save(self) -> None:
        if not self.metrics:
            return
        path = Path(self.metrics_file_path)
        new_keys = set().union(*self.metrics) - set(self.metrics_keys)
        if new_keys or not path.is_file():
            keys = sorted(set(self.metrics_keys) | new_keys)
            rows = read_rows(path)[1] if path.is_file() else []
            write_rows_atomically(path, keys, [*rows, *self.metrics])
            self.metrics_keys = keys
        else:
            with path.open("a", newline="") as handle:
                csv.DictWriter(handle, fieldnames=self.metrics_keys).writerows(self.metrics)
                handle.flush()
                os.fsync(handle.fileno())
        self.metrics = []


class AppendingCSVLogger(CSVLogger):
    """``CSVLogger`` writing ``save_dir/metrics.csv`` that survives resumes and kills.

    Args:
        save_dir: The run directory.
        flush_logs_every_n_steps: Rows reach the disk at least this often.
    """

    def __init__(self, save_dir: str, flush_logs_every_n_steps: int = 1, **kwargs: Any) -> None:
        super().__init__(
            save_dir,
            name="",
            version="",
            flush_logs_every_n_steps=flush_logs_every_n_steps,
            **kwargs,
        )

    @property
    @rank_zero_experiment
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


CHECKPOINT_KEY = "ssl_mt_epoch_metrics"


class EpochMetricsInCheckpoint(L.Callback):
    """Stores the epoch's logged training values in the end-of-epoch checkpoints.

    Lightning saves the end-of-epoch checkpoint a moment before it hands that epoch's
    training values to the loggers; a kill in between would resume after an epoch whose
    training row was never written. :func:`restore_epoch_row` writes it from the checkpoint
    on resume. What is stored is what Lightning is about to log (not ``callback_metrics``,
    which also holds progress-bar-only values and the learning rates logged elsewhere); a
    checkpoint written mid-epoch stores nothing (its epoch has no row yet).
    """

    def __init__(self) -> None:
        self._epoch_ended = False

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_ended = False

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Runs before ModelCheckpoint's on_train_epoch_end (Lightning calls it last).
        self._epoch_ended = True

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if not self._epoch_ended:
            return
        try:  # the epoch-level values Lightning hands the loggers right after this checkpoint
            pending = trainer._logger_connector.metrics["log"]
        except Exception:  # a Lightning without that internal: the broader set
            pending = trainer.callback_metrics
        values = {}
        for key, value in pending.items():
            try:
                values[key] = float(value)
            except (TypeError, ValueError):
                continue
        checkpoint[CHECKPOINT_KEY] = {"epoch": trainer.current_epoch, "metrics": values}


def restore_epoch_row(path: str | Path, checkpoint: dict[str, Any]) -> bool:
    """Appends the checkpoint's epoch values ``metrics.csv`` lacks; True if it did.

    Only the missing values: the kill this repairs falls after the epoch's validation row
    was written, and before its training row.
    """
    stored = checkpoint.get(CHECKPOINT_KEY)
    if not stored or not stored.get("metrics"):
        return False
    path = Path(path)
    epoch = int(stored["epoch"])
    fieldnames, rows = read_rows(path) if path.is_file() else ([], [])
    logged = {
        key
        for row in rows
        if row.get("epoch") and float(row["epoch"]) == epoch
        for key, value in row.items()
        if value
    }
    missing = {k: v for k, v in stored["metrics"].items() if k not in logged}
    if not missing:
        return False
    row = {"epoch": epoch, "step": int(checkpoint.get("global_step", 0)) - 1, **missing}
    write_rows_atomically(path, sorted(set(fieldnames) | set(row)), [*rows, row])
    return True
