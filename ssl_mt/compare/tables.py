"""Tables of a comparison from the runs' logs: final/best metrics, jumps at the resolution
switch; and their markdown."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ssl_mt.compare.keys import LOSS, METRIC_LABELS, _all_tasks, _size_key
from ssl_mt.compare.run import Run, common_keys
from ssl_mt.compare.statistics import (
    is_score,
)


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


def flat_columns(table: pd.DataFrame) -> pd.DataFrame:
    """The table with its ``(stat, run)`` columns joined into ``"stat run"`` (for csv)."""
    flat = table.copy()
    flat.columns = [" ".join(str(p) for p in c) for c in table.columns]
    return flat


def metric_label(metric: str) -> str:
    return f"{METRIC_LABELS.get(metric, metric)} {'↑' if is_score(metric) else '↓'}"


def plain_markdown(table: pd.DataFrame) -> str:
    """A markdown table of plain columns (strings and numbers as they are)."""
    lines = [
        "| " + " | ".join(str(c) for c in table.columns) + " |",
        "|" + "---|" * len(table.columns),
    ]
    for row in table.itertuples(index=False):
        lines.append("| " + " | ".join(_format(v) for v in row) + " |")
    return "\n".join(lines)
