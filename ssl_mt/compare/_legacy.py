"""Compare fine-tuning runs: per-task and global loss curves, final/best metrics, switch jumps.

``python -m ssl_mt.compare RUN_DIR [RUN_DIR ...] --out DIR [--names A B ...]`` reads each
run's ``metrics.csv`` (Lightning's CSVLogger: one row per logging call, empty cells
elsewhere) and ``.hydra/config.yaml``, and writes into ``DIR``:

- ``val_loss.png``: one panel per evaluation resolution; per run (line style) a line per
  task (colour) and the global loss (bold black), against the epoch; every resolution switch
  of the progressive schedule is a vertical line on every panel;
- ``train_loss.png``: the same for the training losses;
- ``report.md``: the jump of the validation loss at each resolution switch (per run, per
  resolution, global and per task, and its difference between runs: the claim "SSL makes the
  jump smaller" reads directly off it), then the final and best value of every metric common
  to the runs (IoU, Dice, top-1, top-5, F1, loss) at every resolution, with the differences
  between runs (each run minus the first); ``summary.csv`` and ``jumps.csv`` hold the same
  numbers unrounded.

The notebook ``notebooks/compare_loss_curves.ipynb`` calls the functions of this module.

Conventions: epochs are the 0-based ``epoch`` column of ``metrics.csv``. A switch at epoch
``e`` means that epoch ``e`` is the first one trained at the new size; the validation at
epoch ``e - 1`` is the last one before it, so the switch line is drawn at ``e - 0.5`` and the
jump is ``val(e) - val(e - 1)`` (the nearest validated epochs on each side when validation is
not run every epoch).

Exit codes: 0 report written; 2 the runs cannot be compared (the message names the folder or
file), without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import Formatter, FuncFormatter

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.csv"
CONFIG_FILE = Path(".hydra") / "config.yaml"
GLOBAL = "global"
LOSS = "loss"
# Row order of the tables: the scores in this order, then any other metric, then the loss.
METRIC_ORDER = ("iou", "dice", "top1", "top5", "f1")
LOWER_IS_BETTER = frozenset({"loss"})
METRIC_LABELS = {
    "iou": "IoU",
    "dice": "Dice",
    "top1": "top-1",
    "top5": "top-5",
    "f1": "F1",
    "loss": "loss",
}
RUN_STYLES = ("-", "--", ":", "-.")
RUN_MARKERS = ("o", "s", "^", "D", "v", "P")
TASK_COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#7f7f7f",
)
GLOBAL_COLOUR = "black"
SWITCH_COLOUR = "0.45"
DPI = 110
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


# -- loading ---------------------------------------------------------------------------------
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


def _select(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


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


def is_score(metric: str) -> bool:
    """True when higher is better (everything but the loss)."""
    return metric not in LOWER_IS_BETTER


# -- tables ----------------------------------------------------------------------------------
def _diff_label(run: Run, first: Run) -> str:
    return f"{run.name} − {first.name}"


def _two_level(
    values: Mapping[str, Mapping[str, list[Any]]],
    runs: Sequence[Run],
    index: pd.MultiIndex,
    diffs: Iterable[str],
    order: Sequence[str],
) -> pd.DataFrame:
    """Columns ``(stat, run)`` in ``order``; each stat in ``diffs`` followed by its
    ``("Δ stat", "B − A")`` columns, B every run after the first A."""
    diffs = set(diffs)
    first = runs[0]
    columns: dict[tuple[str, str], list[Any]] = {}
    for stat in order:
        for run in runs:
            columns[(stat, run.name)] = values[stat][run.name]
        if stat in diffs:
            for run in runs[1:]:
                columns[(f"Δ {stat}", _diff_label(run, first))] = [
                    b - a
                    for a, b in zip(values[stat][first.name], values[stat][run.name], strict=True)
                ]
    table = pd.DataFrame({i: v for i, v in enumerate(columns.values())}, index=index)
    table.columns = pd.MultiIndex.from_tuples(list(columns), names=["stat", "run"])
    return table


def _index(rows: Sequence[tuple[Any, ...]], names: Sequence[str]) -> pd.MultiIndex:
    return pd.MultiIndex.from_arrays(
        [[row[i] for row in rows] for i in range(len(names))], names=list(names)
    )


def summary_table(runs: Sequence[Run]) -> pd.DataFrame:
    """Final and best value of every metric common to the runs, and the differences.

    Returns:
        Rows indexed by ``(size, task, metric)`` (sizes ascending; tasks in config order,
        ``global`` last; IoU, Dice, top-1, top-5, F1, others, loss). Columns are a
        two-level index ``(stat, run)``: ``("final", run)`` for every run, then
        ``("Δ final", "B − A")`` for every run B after the first run A, then ``("best", run)``
        and ``("Δ best", "B − A")``, then ``("best epoch", run)``. Final is the last logged
        value; best is the maximum of a score, the minimum of a loss (the first epoch that
        reaches it).
    """
    keys = common_keys(runs)
    values: dict[str, dict[str, list[Any]]] = {
        stat: {run.name: [] for run in runs} for stat in ("final", "best", "best epoch")
    }
    for size, task, metric in keys:
        for run in runs:
            series = run.val_series(size, task, metric)
            best_epoch = series.idxmax() if is_score(metric) else series.idxmin()
            values["final"][run.name].append(float(series.iloc[-1]))
            values["best"][run.name].append(float(series.loc[best_epoch]))
            values["best epoch"][run.name].append(int(best_epoch))
    index = _index(keys, ["size", "task", "metric"])
    return _two_level(values, runs, index, ("final", "best"), ("final", "best", "best epoch"))


def _value_at_or_before(series: pd.Series, epoch: int) -> tuple[int, float] | None:
    before = series.loc[series.index <= epoch]
    return None if before.empty else (int(before.index[-1]), float(before.iloc[-1]))


def _value_at_or_after(series: pd.Series, epoch: int) -> tuple[int, float] | None:
    after = series.loc[series.index >= epoch]
    return None if after.empty else (int(after.index[0]), float(after.iloc[0]))


def switch_jumps(run: Run) -> pd.DataFrame:
    """The jump of every validation loss at each of the run's resolution switches.

    Returns:
        One row per (switch, size, task) with columns ``switch`` (1-based), ``label``
        (``64→96 px``), ``epoch`` (first epoch of the new stage), ``size``, ``task``,
        ``before`` (val loss at the last validated epoch before the switch), ``after`` (at the
        first validated epoch from the switch on) and ``jump`` = after − before.
    """
    rows = []
    for number, switch in enumerate(run.switches, start=1):
        for size in run.eval_sizes:
            for task in run.tasks:
                series = run.val_series(size, task, LOSS)
                before = _value_at_or_before(series, switch.epoch - 1)
                after = _value_at_or_after(series, switch.epoch)
                if before is None or after is None:
                    continue
                rows.append(
                    {
                        "switch": number,
                        "label": switch.label,
                        "epoch": switch.epoch,
                        "size": size,
                        "task": task,
                        "before": before[1],
                        "after": after[1],
                        "jump": after[1] - before[1],
                    }
                )
    columns = ["switch", "label", "epoch", "size", "task", "before", "after", "jump"]
    return pd.DataFrame(rows, columns=columns)


def jump_table(runs: Sequence[Run]) -> pd.DataFrame:
    """Jumps of the validation losses at the resolution switches, side by side.

    The k-th switch of every run is matched with the k-th of the others.

    Returns:
        Rows indexed by ``(switch, size, task)`` where ``switch`` is the first run's label
        with its number (``1: 64→96 px``); columns ``("jump", run)`` for every run, then
        ``("Δ jump", "B − A")`` for every run B after the first run A (negative: B's loss
        rose less, or fell more, than A's), then ``("before", run)`` and ``("after", run)``.
        Empty (no rows) when no run switched resolution.
    """
    per_run = {run.name: switch_jumps(run) for run in runs}
    labels: dict[int, str] = {}
    keys: set[tuple[int, int | str, str]] = set()
    for frame in per_run.values():
        for row in frame.itertuples(index=False):
            labels.setdefault(row.switch, f"{row.switch}: {row.label}")
            keys.add((row.switch, row.size, row.task))
    tasks = _all_tasks(runs, {k[2] for k in keys})
    ordered = sorted(keys, key=lambda k: (k[0], _size_key(k[1]), tasks.index(k[2])))
    values: dict[str, dict[str, list[Any]]] = {}
    for stat in ("jump", "before", "after"):
        values[stat] = {}
        for run in runs:
            lookup = {
                (r.switch, r.size, r.task): getattr(r, stat)
                for r in per_run[run.name].itertuples(index=False)
            }
            values[stat][run.name] = [lookup.get(k, math.nan) for k in ordered]
    index = _index([(labels[k[0]], k[1], k[2]) for k in ordered], ["switch", "size", "task"])
    return _two_level(values, runs, index, ("jump",), ("jump", "before", "after"))


# -- markdown --------------------------------------------------------------------------------
def _format(value: Any, signed: bool = False) -> str:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(number):
        return "—"
    return f"{number:+.4f}" if signed else f"{number:.4f}"


def dataframe_to_markdown(table: pd.DataFrame) -> str:
    """A GitHub markdown table (index columns first; two-level columns joined by a space)."""
    index_names = [str(n) for n in table.index.names]
    columns = [
        " ".join(str(p) for p in c) if isinstance(c, tuple) else str(c) for c in table.columns
    ]
    signed = [
        isinstance(c, tuple) and (str(c[0]).startswith("Δ") or c[0] == "jump")
        for c in table.columns
    ]
    lines = [
        "| " + " | ".join(index_names + columns) + " |",
        "|" + "---|" * len(index_names) + "---:|" * len(columns),
    ]
    for key, row in zip(table.index, table.itertuples(index=False), strict=True):
        key = key if isinstance(key, tuple) else (key,)
        cells = [str(k) for k in key]
        cells += [_format(v, s) for v, s in zip(row, signed, strict=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _metric_column(table: pd.DataFrame) -> pd.DataFrame:
    """Readable metric names with the direction of better (``IoU ↑``, ``loss ↓``)."""
    table = table.copy()
    table.index = pd.MultiIndex.from_tuples(
        [
            (size, task, f"{METRIC_LABELS.get(metric, metric)} {'↑' if is_score(metric) else '↓'}")
            for size, task, metric in table.index
        ],
        names=table.index.names,
    )
    return table


def _jump_verdicts(jumps: pd.DataFrame, runs: Sequence[Run]) -> list[str]:
    """One line per switch and resolution on the global loss: whose jump is smaller."""
    if len(runs) < 2 or GLOBAL not in jumps.index.get_level_values("task"):
        return []
    first = runs[0]
    lines = []
    for (switch, size, task), row in jumps.iterrows():
        if task != GLOBAL:
            continue
        parts = []
        for run in runs[1:]:
            delta = row[("Δ jump", _diff_label(run, first))]
            if math.isnan(delta):
                verdict = "not measured"
            elif delta < 0:
                verdict = f"smaller for {run.name}"
            elif delta > 0:
                verdict = f"larger for {run.name}"
            else:
                verdict = "equal"
            parts.append(
                f"{run.name} {_format(row[('jump', run.name)], True)} "
                f"(Δ {_format(delta, True)}, {verdict})"
            )
        lines.append(
            f"- switch {switch}, global val loss @ {size} px: jump {first.name} "
            f"{_format(row[('jump', first.name)], True)}; " + "; ".join(parts)
        )
    return [*lines, ""]


def flat_columns(table: pd.DataFrame) -> pd.DataFrame:
    """The table with its ``(stat, run)`` columns joined into ``"stat run"`` (for csv)."""
    flat = table.copy()
    flat.columns = [" ".join(str(p) for p in c) for c in table.columns]
    return flat


def markdown_report(runs: Sequence[Run], images: Mapping[str, str] | None = None) -> str:
    """The comparison as markdown: runs, switch jumps, final/best metrics per resolution.

    Args:
        runs: Loaded runs; the first one is the reference of every difference.
        images: Optional ``{caption: relative path}`` of figures to link at the top.
    """
    first = runs[0]
    lines = ["# Run comparison: " + " vs ".join(r.name for r in runs), ""]
    lines += [
        "| run | folder | epochs | eval sizes (px) | resolution switches |",
        "|---|---|---:|---|---|",
    ]
    for run in runs:
        epochs = int(run.val.index.max()) + 1 if len(run.val.index) else 0
        switches = ", ".join(f"{s.label} at epoch {s.epoch}" for s in run.switches) or "none"
        sizes = ", ".join(str(s) for s in run.eval_sizes)
        lines.append(f"| {run.name} | `{run.path}` | {epochs} | {sizes} | {switches} |")
    lines.append("")
    if images:
        for caption, target in images.items():
            lines += [f"![{caption}]({target})", ""]
    lines += ["## Jump of the validation loss at the resolution switch", ""]
    jumps = jump_table(runs)
    if jumps.empty:
        lines += ["No run changed its training resolution: no jump to measure.", ""]
    else:
        lines += [
            "before = val loss at the last epoch before the switch, after = at the first epoch "
            "of the new stage, jump = after − before (positive: the loss went up)."
            + (
                f" Δ jump = jump of the run − jump of {first.name}: negative means the run's "
                f"loss jumped less than {first.name}'s."
                if len(runs) > 1
                else ""
            ),
            "",
        ]
        lines += _jump_verdicts(jumps, runs)
        lines += [dataframe_to_markdown(jumps), ""]
    lines += [
        "## Final and best validation metrics",
        "",
        "final = last epoch; best = max for scores (↑), min for losses (↓); best epoch is "
        "0-based" + (f"; Δ = run − {first.name}." if len(runs) > 1 else "."),
        "",
    ]
    table = _metric_column(summary_table(runs))
    for size in table.index.get_level_values("size").unique():
        part = table.xs(size, level="size")
        lines += [f"### val @ {size} px", "", dataframe_to_markdown(part), ""]
    return "\n".join(lines)


# -- figures ---------------------------------------------------------------------------------
def _new_figure(panels: int, columns: int = 3, width: float = 5.2) -> tuple[Figure, list[Axes]]:
    columns = max(1, min(columns, panels))
    rows = math.ceil(panels / columns)
    figure = Figure(
        figsize=(width * columns + 2.8, 3.9 * rows + 0.4),
        dpi=DPI,
        layout="constrained",
        facecolor="white",
    )
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False, sharex=True).ravel().tolist()
    for extra in axes[panels:]:
        extra.set_visible(False)
    return figure, axes[:panels]


def _task_colours(tasks: Sequence[str]) -> dict[str, str]:
    colours = {GLOBAL: GLOBAL_COLOUR}
    for i, task in enumerate(t for t in tasks if t != GLOBAL):
        colours[task] = TASK_COLOURS[i % len(TASK_COLOURS)]
    return colours


def _draw_curve(
    axes: Axes, series: pd.Series, task: str, run_index: int, colours: Mapping[str, str]
) -> None:
    if series.empty:
        return
    bold = task == GLOBAL
    axes.plot(
        series.index.to_numpy(),
        series.to_numpy(),
        color=colours[task],
        linestyle=RUN_STYLES[run_index % len(RUN_STYLES)],
        marker=RUN_MARKERS[run_index % len(RUN_MARKERS)],
        markevery=max(1, len(series) // 25),  # long runs: a marker every few epochs
        markersize=4 if bold else 3,
        linewidth=2.6 if bold else 1.2,
        alpha=1.0 if bold else 0.85,
        zorder=3 if bold else 2,
    )


def _draw_switches(axes: Axes, runs: Sequence[Run], annotate: bool) -> None:
    """A vertical line between the last epoch of a stage and the first of the next."""
    drawn: dict[int, list[str]] = {}
    for run in runs:
        for switch in run.switches:
            drawn.setdefault(switch.epoch, [])
            if switch.label not in drawn[switch.epoch]:
                drawn[switch.epoch].append(switch.label)
    for epoch, labels in sorted(drawn.items()):
        x = epoch - 0.5
        axes.axvline(x, color=SWITCH_COLOUR, linestyle=(0, (4, 2, 1, 2)), linewidth=1.3, zorder=1)
        if annotate:
            axes.annotate(
                " / ".join(labels),
                xy=(x, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(3, -3),
                textcoords="offset points",
                ha="left",
                va="top",
                fontsize=8,
                color=SWITCH_COLOUR,
            )


def _title(figure: Figure, what: str, runs: Sequence[Run]) -> None:
    figure.suptitle(f"{what}: {' vs '.join(r.name for r in runs)}", x=0.02, ha="left")


def _legend(figure: Figure, runs: Sequence[Run], tasks: Sequence[str]) -> None:
    colours = _task_colours(tasks)
    handles = [
        Line2D([], [], color=colours[t], linewidth=2.6 if t == GLOBAL else 1.4) for t in tasks
    ]
    labels = [f"{GLOBAL} (sum of task losses)" if t == GLOBAL else t for t in tasks]
    for i, run in enumerate(runs):
        handles.append(
            Line2D(
                [],
                [],
                color="0.2",
                linestyle=RUN_STYLES[i % len(RUN_STYLES)],
                marker=RUN_MARKERS[i % len(RUN_MARKERS)],
                markersize=4,
            )
        )
        labels.append(f"run: {run.name}")
    if any(run.switches for run in runs):
        handles.append(Line2D([], [], color=SWITCH_COLOUR, linestyle=(0, (4, 2, 1, 2))))
        labels.append("resolution switch")
    figure.legend(
        handles, labels, loc="outside right upper", fontsize=9, title="colour = task, style = run"
    )


class _MinorLogFormatter(Formatter):
    """Labels the 2, 3, 5 and 7 minor ticks of a log axis spanning less than ~1.5 decades."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        low, high = sorted(self.axis.get_view_interval())
        if x <= 0 or low <= 0 or high / low > 30:
            return ""
        mantissa = round(x / 10 ** math.floor(math.log10(x)), 6)
        return f"{x:g}" if mantissa in (2.0, 3.0, 5.0, 7.0) else ""


def _style_axes(axes: Axes, title: str, logy: bool) -> None:
    axes.set_title(title)
    axes.set_xlabel("epoch")
    axes.set_ylabel("loss" + (" (log scale)" if logy else ""))
    if logy:
        axes.set_yscale("log")
        # Plain numbers on the ticks: losses rarely span more than two decades.
        axes.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        axes.yaxis.set_minor_formatter(_MinorLogFormatter())
    axes.grid(True, alpha=0.3)
    axes.xaxis.get_major_locator().set_params(integer=True)


def plot_val_losses(runs: Sequence[Run], logy: bool = True, columns: int = 3) -> Figure:
    """Validation losses: one panel per evaluation resolution.

    In each panel, per run (line style): a thin line per task and the global loss in bold
    black; every resolution switch is a vertical line at ``epoch - 0.5``.

    Args:
        runs: Loaded runs.
        logy: Logarithmic loss axis (the default: the global loss is the sum of the task
            losses, several times larger than each).
        columns: Panels per row.
    """
    sizes = _sorted_sizes(s for run in runs for s in run.eval_sizes)
    tasks = _all_tasks(runs, {t for run in runs for t in run.tasks})
    colours = _task_colours(tasks)
    figure, axes_list = _new_figure(len(sizes), columns)
    for axes, size in zip(axes_list, sizes, strict=True):
        for i, run in enumerate(runs):
            for task in tasks:
                _draw_curve(axes, run.val_series(size, task, LOSS), task, i, colours)
        _draw_switches(axes, runs, annotate=True)
        _style_axes(axes, f"val @ {size} px", logy)
    _title(figure, "Validation loss per task (thin) and global (bold)", runs)
    _legend(figure, runs, tasks)
    return figure


def plot_train_losses(runs: Sequence[Run], logy: bool = True) -> Figure:
    """Training losses (each epoch at the size of its stage), per task and global."""
    tasks = _all_tasks(
        runs,
        {
            parts[1]
            for run in runs
            for parts in (c.split("/") for c in run.train.columns)
            if len(parts) == 3 and parts[0] == "train" and parts[2] == LOSS
        },
    )
    colours = _task_colours(tasks)
    figure, (axes,) = _new_figure(1, width=6.5)
    for i, run in enumerate(runs):
        for task in tasks:
            _draw_curve(axes, run.train_series(task), task, i, colours)
    _draw_switches(axes, runs, annotate=True)
    plans = []
    for run in runs:
        sizes = [s.before for s in run.switches[:1]] + [s.after for s in run.switches]
        plans.append(" → ".join(str(s) for s in sizes) + " px" if sizes else "one size")
    _style_axes(axes, f"train @ {' | '.join(dict.fromkeys(plans))}", logy)
    _title(figure, "Training loss per task (thin) and global (bold)", runs)
    if tasks:
        _legend(figure, runs, tasks)
    return figure


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Saves a PNG without a timestamp or version in its metadata (byte-stable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI, facecolor="white", metadata={"Software": None})
    return path


def write_report(runs: Sequence[Run], out: str | Path, logy: bool = True) -> dict[str, Path]:
    """Writes ``val_loss.png``, ``train_loss.png``, ``report.md``, ``summary.csv`` and
    ``jumps.csv`` into ``out``.

    Returns:
        ``{"report": ..., "val_loss": ..., "train_loss": ..., "summary": ..., "jumps": ...}``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "val_loss": save_figure(plot_val_losses(runs, logy=logy), out / "val_loss.png"),
        "train_loss": save_figure(plot_train_losses(runs, logy=logy), out / "train_loss.png"),
    }
    images = {
        "validation loss per resolution": paths["val_loss"].name,
        "training loss": paths["train_loss"].name,
    }
    report = out / "report.md"
    report.write_text(markdown_report(runs, images) + "\n", encoding="utf-8")
    paths["report"] = report
    paths["summary"] = out / "summary.csv"
    flat_columns(summary_table(runs)).to_csv(paths["summary"])
    paths["jumps"] = out / "jumps.csv"
    flat_columns(jump_table(runs)).to_csv(paths["jumps"])
    return paths


# -- command line ----------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ssl_mt.compare",
        description=(
            "Compare fine-tuning runs: validation/training loss curves per task and global "
            "(resolution switches marked), final/best metrics and the jump of the validation "
            "loss at each resolution switch. Differences are each run minus the first."
        ),
    )
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories")
    parser.add_argument("--out", type=Path, required=True, help="folder for the report")
    parser.add_argument(
        "--names", nargs="+", default=None, metavar="NAME", help="one display name per run"
    )
    parser.add_argument(
        "--linear", action="store_true", help="linear loss axis (default: logarithmic)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        runs = load_runs(args.runs, args.names)
        paths = write_report(runs, args.out, logy=not args.linear)
    except CompareError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    print(f"report: {paths['report']}")
    for key in ("val_loss", "train_loss", "summary", "jumps"):
        print(f"  {key}: {paths[key]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
