"""Reading one fine-tuning run: ``metrics.csv``, ``.hydra/config.yaml``, resolution switches.

A run is a folder written by ``python -m ssl_mt.finetune``. Conventions: epochs are the
0-based ``epoch`` column of ``metrics.csv``; a switch at epoch ``e`` means that epoch ``e`` is
the first one trained at the new size. Arms of runs are in :mod:`ssl_mt.compare.arms`,
evaluation records in :mod:`ssl_mt.compare.records`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ssl_mt.compare.keys import (
    LOSS,
    _is_val_key,
    _metric_rank,
    _order_tasks,
    _select,
    _size_key,
    _sorted_sizes,
    parse_val_key,
    val_key,
)

METRICS_FILE = "metrics.csv"
CONFIG_FILE = Path(".hydra") / "config.yaml"
EXIT_ERROR = 2


class CompareError(Exception):
    """The runs cannot be compared; the message names the folder or file at fault."""


@dataclass(frozen=True)
class Switch:
    """A change of training resolution.

    Attributes:
        epoch: First epoch trained at the new size.
        before: Training size of the previous stage (None when unknown).
        after: Training size from ``epoch`` on (None when unknown).
    """

    epoch: int
    before: int | None
    after: int | None

    @property
    def label(self) -> str:
        before = "?" if self.before is None else str(self.before)
        after = "?" if self.after is None else str(self.after)
        return f"{before}→{after} px"


@dataclass
class Run:
    """One run's logged metrics, one row per epoch.

    Attributes:
        name: Display name (``experiment_name`` of the config, or given).
        path: The run directory.
        config: The composed Hydra config as a plain dict, unresolved (empty when absent).
        val: Validation metrics indexed by epoch; columns are the logged keys
            ``val/<size>/<task>/<metric>``; the last value logged in an epoch wins.
        train: Training metrics indexed by epoch: ``train/...`` and ``weights/...`` keys.
        switches: Resolution switches, from the ``train/size`` column when it was logged,
            else from the config's ``schedule.stages``.
    """

    name: str
    path: Path
    config: dict[str, Any]
    val: pd.DataFrame
    train: pd.DataFrame
    switches: list[Switch] = field(default_factory=list)

    @property
    def switch_epochs(self) -> list[int]:
        return [s.epoch for s in self.switches]

    @property
    def eval_sizes(self) -> list[int | str]:
        """Evaluation resolutions present in the validation logs, ascending."""
        return _sorted_sizes({parse_val_key(c)[0] for c in self.val.columns})

    @property
    def tasks(self) -> list[str]:
        """Tasks with validation metrics: the config's order, then others; ``global`` last."""
        return _order_tasks({parse_val_key(c)[1] for c in self.val.columns}, self.config)

    def val_series(self, size: int | str, task: str, metric: str) -> pd.Series:
        """One validation curve (epoch-indexed, NaN-free); empty when never logged."""
        key = val_key(size, task, metric)
        if key not in self.val.columns:
            return pd.Series(dtype=float)
        return self.val[key].dropna()

    def train_series(self, task: str) -> pd.Series:
        """The training loss of a task (or ``global``), epoch-indexed, NaN-free."""
        key = f"train/{task}/{LOSS}"
        if key not in self.train.columns:
            return pd.Series(dtype=float)
        return self.train[key].dropna()


def find_metrics_file(path: str | Path) -> Path:
    """``RUN/metrics.csv``; a ``metrics.csv`` file itself is accepted too."""
    path = Path(path)
    if path.is_file() and path.name == METRICS_FILE:
        return path
    if not path.exists():
        raise CompareError(f"{path}: no such folder")
    if not path.is_dir():
        raise CompareError(f"{path}: not a run folder (give the folder that holds {METRICS_FILE})")
    candidate = path / METRICS_FILE
    if candidate.is_file():
        return candidate
    nested = sorted(path.glob(f"*/{METRICS_FILE}")) + sorted(path.glob(f"*/*/{METRICS_FILE}"))
    if len(nested) == 1:
        return nested[0]
    hint = (
        f" (found {len(nested)} below it: {', '.join(str(p) for p in nested[:5])}; give one)"
        if nested
        else " (is it a run directory of `python -m ssl_mt.finetune`?)"
    )
    raise CompareError(f"{path}: not a run, no {METRICS_FILE}{hint}")


def read_config(run_dir: Path) -> dict[str, Any]:
    """The run's ``.hydra/config.yaml`` as a plain dict, interpolations left as strings."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    try:
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as error:  # a broken yaml must not hide the metrics
        raise CompareError(f"{path}: not a readable config ({error})") from error
    return config if isinstance(config, dict) else {}


def read_metrics(path: Path) -> pd.DataFrame:
    """``metrics.csv`` as a numeric DataFrame (CSVLogger layout)."""
    try:
        table = pd.read_csv(path)
    except pd.errors.EmptyDataError as error:
        raise CompareError(f"{path}: empty, nothing was logged") from error
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise CompareError(f"{path}: not a readable csv ({error})") from error
    if "epoch" not in table.columns:
        raise CompareError(
            f"{path}: no `epoch` column (columns: {list(table.columns)[:10]}); "
            "expected the CSVLogger layout"
        )
    return table.apply(pd.to_numeric, errors="coerce")


def per_epoch(table: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """One row per epoch: the last non-empty value of each column within the epoch."""
    if not columns:
        return pd.DataFrame(index=pd.Index([], name="epoch", dtype=int))
    rows = table.loc[table["epoch"].notna() & table[list(columns)].notna().any(axis=1)]
    frame = rows[["epoch", *columns]].groupby("epoch", sort=True).last()
    frame.index = frame.index.astype(int)
    frame.index.name = "epoch"
    return frame.astype(float)


def switches_from_sizes(sizes: pd.Series) -> list[Switch]:
    """Switches where the logged ``train/size`` changes from one epoch to the next."""
    sizes = sizes.dropna()
    switches = []
    previous = None
    for epoch, size in sizes.items():
        size = int(size)
        if previous is not None and size != previous:
            switches.append(Switch(int(epoch), previous, size))
        previous = size
    return switches


def switches_from_stages(stages: Any) -> list[Switch]:
    """Switches from ``schedule.stages`` (list of ``{size, epochs, ...}``)."""
    if not isinstance(stages, list):
        return []
    switches, start, previous = [], 0, None
    for stage in stages:
        try:
            size, epochs = int(stage["size"]), int(stage["epochs"])
        except (KeyError, TypeError, ValueError):
            return []
        if previous is not None and size != previous:
            switches.append(Switch(start, previous, size))
        start += epochs
        previous = size
    return switches


def load_run(path: str | Path, name: str | None = None) -> Run:
    """Loads one run directory.

    Args:
        path: The run directory (holding ``metrics.csv`` and ``.hydra/config.yaml``) or its
            ``metrics.csv``.
        name: Display name; default the config's ``experiment_name``, else the folder name.

    Raises:
        CompareError: No ``metrics.csv``, an unreadable one, or no validation logs.
    """
    metrics_path = find_metrics_file(path)
    run_dir = metrics_path.parent
    config = read_config(run_dir)
    table = read_metrics(metrics_path)
    val_columns = [c for c in table.columns if _is_val_key(c)]
    val = per_epoch(table, val_columns).dropna(axis=1, how="all")
    if val.empty:
        raise CompareError(
            f"{metrics_path}: no validation logs (no `val/<size>/<task>/<metric>` values); "
            "did the run reach the end of its first epoch?"
        )
    train_columns = [c for c in table.columns if c.startswith(("train/", "weights/"))]
    train = per_epoch(table, train_columns).dropna(axis=1, how="all")
    if "train/size" in train.columns and train["train/size"].notna().any():
        switches = switches_from_sizes(train["train/size"])
    else:
        switches = switches_from_stages(_select(config, "schedule.stages"))
    if name is None:
        name = _select(config, "experiment_name")
        name = str(name) if name not in (None, "") else run_dir.name
    return Run(name=name, path=run_dir, config=config, val=val, train=train, switches=switches)


def unique_names(names: Iterable[str]) -> list[str]:
    """Keeps names; a repeated one gets ``_2``, ``_3``, ... (never clashing with another)."""
    names = list(names)
    taken = set(names)
    seen: set[str] = set()
    result = []
    for name in names:
        if name not in seen:
            seen.add(name)
            result.append(name)
            continue
        k = 2
        while f"{name}_{k}" in taken or f"{name}_{k}" in seen:
            k += 1
        new = f"{name}_{k}"
        seen.add(new)
        result.append(new)
    return result


def load_runs(paths: Sequence[str | Path], names: Sequence[str] | None = None) -> list[Run]:
    """Loads several runs, names them uniquely and checks they share at least one metric.

    Raises:
        CompareError: See :func:`load_run`; also no run given, ``names`` of the wrong length,
            or no validation metric logged by every run.
    """
    if not paths:
        raise CompareError("no run directory given")
    if names is not None and len(names) != len(paths):
        raise CompareError(f"{len(names)} name(s) for {len(paths)} run(s): give one name per run")
    runs = [load_run(p, None if names is None else names[i]) for i, p in enumerate(paths)]
    for run, name in zip(runs, unique_names(r.name for r in runs), strict=True):
        run.name = name
    common_keys(runs)  # raises when there is nothing to compare
    return runs


def common_keys(runs: Sequence[Run]) -> list[tuple[int | str, str, str]]:
    """``(size, task, metric)`` logged by every run, in table order."""
    keys = None
    for run in runs:
        own = {parse_val_key(c) for c in run.val.columns}
        keys = own if keys is None else keys & own
    if not keys:
        listing = "; ".join(
            f"{run.name} ({run.path}): {', '.join(sorted(run.val.columns)[:6])}"
            + (" ..." if len(run.val.columns) > 6 else "")
            for run in runs
        )
        raise CompareError(f"the runs have no validation metric in common: {listing}")
    tasks = _order_tasks({k[1] for k in keys}, runs[0].config)
    return sorted(
        keys,
        key=lambda k: (_size_key(k[0]), tasks.index(k[1]), _metric_rank(k[2])),
    )
