"""Tables of a comparison: final/best metrics, jumps at the resolution switch, and the
differences between arms with their intervals and verdicts."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ssl_mt.compare.runs import (
    GLOBAL,
    LOSS,
    Arm,
    CompareError,
    Run,
    StudyCell,
    TaskInfo,
    _all_tasks,
    _size_key,
    common_keys,
    load_records,
    read_config,
    task_infos,
)
from ssl_mt.compare.statistics import (
    GLOBAL_LOSS,
    BootstrapSettings,
    Comparison,
    compare_arms,
    ingredients,
    is_score,
)
from ssl_mt.evaluation.records import RECORDS_DIR

METRIC_LABELS = {
    "iou": "IoU",
    "dice": "Dice",
    "top1": "top-1",
    "top5": "top-5",
    "f1": "F1",
    "loss": "loss",
}


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


# -- differences between arms, from the evaluation records -----------------------------------------
@dataclass(frozen=True)
class RecordsChoice:
    """Which records are compared and how (``conf/compare.yaml``).

    Attributes:
        checkpoint: ``best`` or ``last``.
        split: ``val`` or ``test``.
        bootstrap: Bootstrap settings.
    """

    checkpoint: str
    split: str
    bootstrap: BootstrapSettings


def arm_records(
    arms: Sequence[Arm], checkpoint: str, split: str
) -> tuple[list[list[dict[int, pd.DataFrame]]], list[Path]]:
    """Per arm, per run, the records by eval size; and the runs that have none."""
    records = [[load_records(run.path, checkpoint, split) for run in arm.runs] for arm in arms]
    missing = [
        run.path
        for arm, per_run in zip(arms, records, strict=True)
        for run, found in zip(arm.runs, per_run, strict=True)
        if not found
    ]
    return records, missing


def _task_rows(table: pd.DataFrame, task: str) -> pd.DataFrame:
    return table[table["task"] == task].set_index("image")


def aligned_ingredients(
    per_arm: Sequence[Sequence[pd.DataFrame]], task: TaskInfo, metric: str
) -> tuple[list[np.ndarray], int, int]:
    """The ingredients ``(S, N, k)`` of every arm on the images common to every run.

    Args:
        per_arm: Per arm, per run, the records at one size.
        task: The task.
        metric: The metric.

    Returns:
        Per arm the ingredients, the number of common images and of images left out (labeled
        in some run's records but not in all).
    """
    tables = [[_task_rows(t, task.name) for t in runs] for runs in per_arm]
    sets = [set(t.index) for runs in tables for t in runs]
    common = sorted(set.intersection(*sets))
    left_out = len(set.union(*sets)) - len(common)
    arms = [
        np.stack([ingredients(t.loc[common], metric, task.num_classes) for t in runs])
        for runs in tables
    ]
    return arms, len(common), left_out


def global_ingredients(
    per_arm: Sequence[Sequence[pd.DataFrame]], tasks: Sequence[TaskInfo]
) -> tuple[list[np.ndarray], int, int]:
    """Ingredients of the global loss (sum of the task losses) over the images common to
    every run: per task its loss and a 1 where the image is labeled for it, else 0 and 0."""
    tables = [[t.set_index(["image", "task"])["loss"] for t in runs] for runs in per_arm]
    sets = [set(t.index.get_level_values("image")) for runs in tables for t in runs]
    common = sorted(set.intersection(*sets))
    left_out = len(set.union(*sets)) - len(common)
    arms = []
    for runs in tables:
        seeds = []
        for losses in runs:
            columns = []
            for task in tasks:
                values = losses.xs(task.name, level="task").reindex(common)
                labeled = values.notna().to_numpy(dtype=float)
                columns += [np.nan_to_num(values.to_numpy(dtype=float)), labeled]
            seeds.append(np.stack(columns, axis=1))
        arms.append(np.stack(seeds))
    return arms, len(common), left_out


def _first_config(arms: Sequence[Arm]) -> Mapping[str, Any]:
    return arms[0].runs[0].config if arms and arms[0].runs else {}


def comparison_rows(
    names: Sequence[str],
    per_arm: Sequence[Sequence[Mapping[int, pd.DataFrame]]],
    config: Mapping[str, Any],
    settings: BootstrapSettings,
) -> list[dict[str, Any]]:
    """Rows of :func:`comparison_table` for arms given by name and records."""
    sizes = sorted(set.intersection(*[set(r) for runs in per_arm for r in runs]))
    rows = []
    for size in sizes:
        at_size = [[r[size] for r in runs] for runs in per_arm]
        tasks = task_infos(config, (t for runs in at_size for t in runs))
        present = [
            t for t in tasks if all((r["task"] == t.name).any() for runs in at_size for r in runs)
        ]
        jobs = [(t.name, m, t) for t in present for m in t.metrics]
        jobs.append((GLOBAL, LOSS, None))
        for task_name, metric, task in jobs:
            if task is None:
                x, images, left_out = global_ingredients(at_size, present)
                key = GLOBAL_LOSS
            else:
                x, images, left_out = aligned_ingredients(at_size, task, metric)
                key = metric
            if images == 0:
                continue
            for result in compare_arms(x, names, key, settings):
                rows.append(_row(size, task_name, metric, result, images, left_out))
    return rows


def _row(size: int, task: str, metric: str, c: Comparison, images: int, left_out: int) -> dict:
    return {
        "size": size,
        "task": task,
        "metric": metric,
        "reference": c.reference.name,
        "arm": c.arm.name,
        "reference value": c.reference.value,
        "reference std": c.reference.std,
        "reference low": c.reference.low,
        "reference high": c.reference.high,
        "reference seeds": c.reference.seeds,
        "value": c.arm.value,
        "std": c.arm.std,
        "low": c.arm.low,
        "high": c.arm.high,
        "seeds": c.arm.seeds,
        "difference": c.difference,
        "difference low": c.low,
        "difference high": c.high,
        "verdict": c.verdict,
        "images": images,
        "images left out": left_out,
    }


COMPARISON_COLUMNS = [
    "size",
    "task",
    "metric",
    "reference",
    "arm",
    "reference value",
    "reference std",
    "reference low",
    "reference high",
    "reference seeds",
    "value",
    "std",
    "low",
    "high",
    "seeds",
    "difference",
    "difference low",
    "difference high",
    "verdict",
    "images",
    "images left out",
]


def comparison_table(arms: Sequence[Arm], choice: RecordsChoice) -> pd.DataFrame:
    """Every arm after the first against the first, per eval size, task and metric.

    Rows: one per (size, task, metric, arm): the reference's and the arm's mean over seeds,
    std over seeds and interval; the difference (arm − reference) with its interval; the
    verdict; the images compared and those left out (not in every run's records). The
    ``global`` loss is the sum of the task losses. Empty when a run has no records.
    """
    records, missing = arm_records(arms, choice.checkpoint, choice.split)
    if missing or len(arms) < 2:
        return pd.DataFrame(columns=COMPARISON_COLUMNS)
    rows = comparison_rows([a.name for a in arms], records, _first_config(arms), choice.bootstrap)
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)


def verdict_table(comparisons: pd.DataFrame) -> pd.DataFrame:
    """Per task, its main metric at the largest eval size, then the global loss: one row per
    (task, arm) with ``reference ± std``, ``arm ± std``, ``Δ [interval]`` and the verdict."""
    if comparisons.empty:
        return pd.DataFrame()
    size = max(comparisons["size"])
    at_size = comparisons[comparisons["size"] == size]
    rows = []
    for (task, arm), part in at_size.groupby(["task", "arm"], sort=False):
        row = part.iloc[0]  # the main metric comes first
        rows.append(
            {
                "task": task,
                "metric": metric_label(row["metric"]),
                f"{row['reference']} (reference)": _mean_std(
                    row["reference value"], row["reference std"]
                ),
                "arm": arm,
                "arm value": _mean_std(row["value"], row["std"]),
                "Δ [95% interval]": _difference(row),
                "verdict": row["verdict"],
            }
        )
    table = pd.DataFrame(rows)
    table.attrs["size"] = size
    return table


def metric_label(metric: str) -> str:
    return f"{METRIC_LABELS.get(metric, metric)} {'↑' if is_score(metric) else '↓'}"


def _mean_std(value: float, std: float) -> str:
    return f"{value:.4f}" if math.isnan(std) else f"{value:.4f} ± {std:.4f}"


def _difference(row: Mapping[str, Any]) -> str:
    return f"{row['difference']:+.4f} [{row['difference low']:+.4f}, {row['difference high']:+.4f}]"


def plain_markdown(table: pd.DataFrame) -> str:
    """A markdown table of plain columns (strings and numbers as they are)."""
    lines = [
        "| " + " | ".join(str(c) for c in table.columns) + " |",
        "|" + "---|" * len(table.columns),
    ]
    for row in table.itertuples(index=False):
        lines.append("| " + " | ".join(_format(v) for v in row) + " |")
    return "\n".join(lines)


# -- label-efficiency study ---------------------------------------------------------------------------
def study_table(
    cells: Sequence[StudyCell], choice: RecordsChoice, reference: str | None = None
) -> pd.DataFrame:
    """Per label fraction, every arm against the reference arm, as :func:`comparison_table`
    rows with a ``fraction`` column (percent). Each arm's interval is over its seeds and the
    images; the reference arm's own row (difference 0) carries its value and interval.

    Raises:
        CompareError: The reference arm is unknown, or a seed folder has no records.
    """
    arms = sorted({c.arm for c in cells})
    if reference is None:
        reference = arms[0]
    if reference not in arms:
        raise CompareError(f"reference arm {reference!r} is not in the study (arms: {arms})")
    order = [reference, *[a for a in arms if a != reference]]
    rows = []
    for fraction in sorted({c.fraction for c in cells}):
        here = {c.arm: c for c in cells if c.fraction == fraction}
        names = [a for a in order if a in here]
        per_arm = []
        for name in names:
            runs = []
            for run_dir in here[name].runs:
                found = load_records(run_dir, choice.checkpoint, choice.split)
                if not found:
                    raise CompareError(
                        f"{run_dir}: no evaluation records {RECORDS_DIR}/{choice.checkpoint}/"
                        f"{choice.split}_<size>.csv.gz (written at the end of fine-tuning)"
                    )
                runs.append(found)
            per_arm.append(runs)
        config = read_config(here[names[0]].runs[0])
        if len(names) == 1:
            names, per_arm = [names[0], names[0]], [per_arm[0], per_arm[0]]
        for row in comparison_rows(names, per_arm, config, choice.bootstrap):
            rows.append({"fraction": fraction, **row})
    table = pd.DataFrame(rows, columns=["fraction", *COMPARISON_COLUMNS])
    table.attrs["reference"] = reference
    return table
