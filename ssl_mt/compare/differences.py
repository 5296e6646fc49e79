"""Differences between arms from their evaluation records: per eval size, task and metric,
each arm against the reference with intervals and verdicts; the label-efficiency table."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ssl_mt.compare.arms import Arm
from ssl_mt.compare.ingredients import GLOBAL_LOSS, ingredients
from ssl_mt.compare.keys import GLOBAL, LOSS
from ssl_mt.compare.records import TaskInfo, load_records, task_infos
from ssl_mt.compare.run import CompareError, read_config
from ssl_mt.compare.statistics import BootstrapSettings, Comparison, compare_arms_metrics
from ssl_mt.compare.study_layout import StudyCell
from ssl_mt.compare.tables import metric_label
from ssl_mt.evaluation.records import RECORDS_DIR


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
        for task in [*present, None]:
            if task is None:  # the global loss: the sum of the task losses
                x, images, left_out = global_ingredients(at_size, present)
                by_metric, labels, name = {GLOBAL_LOSS: x}, {GLOBAL_LOSS: LOSS}, GLOBAL
            else:
                by_metric, labels, name = {}, {}, task.name
                for metric in task.metrics:
                    by_metric[metric], images, left_out = aligned_ingredients(at_size, task, metric)
                    labels[metric] = metric
            if images == 0:
                continue
            results = compare_arms_metrics(by_metric, names, settings)
            for key, comparisons in results.items():
                for result in comparisons:
                    rows.append(_row(size, name, labels[key], result, images, left_out))
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


def verdict_table(comparisons: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Per task, its main metric at the largest eval size, then the global loss: one row per
    (task, arm) with ``reference ± std``, ``arm ± std``, ``Δ [interval]`` and the verdict."""
    if comparisons.empty:
        return pd.DataFrame()
    size = max(comparisons["size"])
    at_size = comparisons[comparisons["size"] == size]
    rows = []
    for (task, _), part in at_size.groupby(["task", "arm"], sort=False):
        row = part.iloc[0]  # the main metric comes first
        rows.append(_verdict_cells(row, {"task": task}, confidence))
    table = pd.DataFrame(rows)
    table.attrs["size"] = size
    return table


def _verdict_cells(
    row: Mapping[str, Any],
    first: Mapping[str, Any],
    confidence: float,
    after_metric: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One verdict line: ``first`` cells, the metric, ``after_metric`` cells, then reference
    ± std, arm, arm ± std, the difference with its interval and the verdict."""
    return {
        **first,
        "metric": metric_label(row["metric"]),
        **(after_metric or {}),
        f"{row['reference']} (reference)": _mean_std(row["reference value"], row["reference std"]),
        "arm": row["arm"],
        "arm value": _mean_std(row["value"], row["std"]),
        f"Δ [{confidence:.0%} interval]": _difference(row),
        "verdict": row["verdict"],
    }


def _mean_std(value: float, std: float) -> str:
    return f"{value:.4f}" if math.isnan(std) else f"{value:.4f} ± {std:.4f}"


def _difference(row: Mapping[str, Any]) -> str:
    return f"{row['difference']:+.4f} [{row['difference low']:+.4f}, {row['difference high']:+.4f}]"


# -- label-efficiency study ---------------------------------------------------------------------------
DEFAULT_REFERENCE = "mt"


def study_table(
    cells: Sequence[StudyCell], choice: RecordsChoice, reference: str | None = None
) -> pd.DataFrame:
    """Per label fraction, every arm against the reference arm, as :func:`comparison_table`
    rows with a ``fraction`` column (percent). Each arm's interval is over its seeds and the
    images; the reference arm's own row (difference 0) carries its value and interval.
    The reference defaults to the arm ``mt`` when the study has one, else the first by name.

    Raises:
        CompareError: The reference arm is unknown, or a seed folder has no records.
    """
    arms = sorted({c.arm for c in cells})
    if reference is None:  # the random-init arm when there is one
        reference = DEFAULT_REFERENCE if DEFAULT_REFERENCE in arms else arms[0]
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


def study_summary(table: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Per task, its main metric at the largest eval size, then the global loss: one row per
    (task, label fraction, arm) of a :func:`study_table`, as :func:`verdict_table` words it."""
    if table.empty:
        return pd.DataFrame()
    size = max(table["size"])
    at_size = table[(table["size"] == size) & (table["arm"] != table["reference"])]
    rows = []
    for task, part in at_size.groupby("task", sort=False):
        main_metric = part["metric"].iloc[0]  # the main metric comes first
        for row in part[part["metric"] == main_metric].sort_values("fraction").to_dict("records"):
            rows.append(
                _verdict_cells(row, {"task": task}, confidence, {"labels": f"{row['fraction']:g}%"})
            )
    summary = pd.DataFrame(rows)
    summary.attrs["size"] = size
    return summary
