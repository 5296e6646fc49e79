"""Differences between arms from their evaluation records: per eval size, task and metric,
each arm against the reference with intervals and verdicts; the label-efficiency table."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ssl_mt.compare.arms import Arm
from ssl_mt.compare.ingredients import GLOBAL_LOSS, ingredients
from ssl_mt.compare.keys import GLOBAL, LOSS
from ssl_mt.compare.multiplicity import apply_family
from ssl_mt.compare.records import TaskInfo, load_records, task_infos
from ssl_mt.compare.run import CompareError, read_config
from ssl_mt.compare.selection import RecordsChoice, resolve_choice
from ssl_mt.compare.statistics import (
    BootstrapSettings,
    Comparison,
    compare_arms_metrics,
    strata_of,
)
from ssl_mt.compare.study_layout import StudyCell
from ssl_mt.compare.tables import metric_label
from ssl_mt.evaluation.records import RECORDS_DIR


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
) -> tuple[list[np.ndarray], int, int, list[np.ndarray]]:
    """Ingredients of the global loss (sum of the task losses) over the images common to
    every run: per task its loss and a 1 where the image is labeled for it, else 0 and 0.

    Returns:
        Per arm the ingredients, the number of common images, of images left out, and the
        strata of the bootstrap: the images labeled for the same tasks (in any run), so a
        replicate never loses a task with few labeled images.
    """
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
    labeled = np.stack([x[:, :, 1::2] > 0 for x in arms]).any(axis=(0, 1))
    return arms, len(common), left_out, strata_of(labeled)


def _first_config(arms: Sequence[Arm]) -> Mapping[str, Any]:
    return arms[0].runs[0].config if arms and arms[0].runs else {}


def comparison_rows(
    names: Sequence[str],
    per_arm: Sequence[Sequence[Mapping[int, pd.DataFrame]]],
    config: Mapping[str, Any],
    settings: BootstrapSettings,
    min_images: int = 0,
    notes: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Rows of :func:`comparison_table` for arms given by name and records.

    Args:
        names: Arm names, the reference first.
        per_arm: Per arm, per run, the records by eval size.
        config: A run's config (task metrics and classes).
        settings: Bootstrap settings.
        min_images: Rows of a task with fewer images carry a ``warning``.
        notes: Receives one line per task or size left out, and why.
    """
    notes = [] if notes is None else notes
    sizes = sorted(set.intersection(*[set(r) for runs in per_arm for r in runs]))
    every_size = sorted(set.union(*[set(r) for runs in per_arm for r in runs]))
    for size in every_size:
        if size not in sizes:
            notes.append(f"{size} px: not in every run's records, left out")
    rows = []
    for size in sizes:
        at_size = [[r[size] for r in runs] for runs in per_arm]
        tasks = task_infos(config, (t for runs in at_size for t in runs))
        present = []
        for t in tasks:
            if all((r["task"] == t.name).any() for runs in at_size for r in runs):
                present.append(t)
            else:
                notes.append(
                    f"{t.name} @ {size} px: not in every run's records (no labeled image), "
                    "left out of the table and of the global loss"
                )
        for task in [*present, None]:
            strata = None
            if task is None:  # the global loss: the sum of the task losses
                if not present:
                    continue
                x, images, left_out, strata = global_ingredients(at_size, present)
                by_metric, labels, name, main = {GLOBAL_LOSS: x}, {GLOBAL_LOSS: LOSS}, GLOBAL, LOSS
            else:
                by_metric, labels, name, main = {}, {}, task.name, task.main_metric
                for metric in task.metrics:
                    by_metric[metric], images, left_out = aligned_ingredients(at_size, task, metric)
                    labels[metric] = metric
            if images == 0:
                notes.append(f"{name} @ {size} px: no image in common between the runs, left out")
                continue
            warning = ""
            if images < min_images:
                warning = (
                    f"only {images} image(s) (< {min_images}): the percentile interval "
                    "covers less than its nominal level"
                )
            if left_out:
                notes.append(
                    f"{name} @ {size} px: {left_out} image(s) not in every run's records left out"
                )
            results = compare_arms_metrics(by_metric, names, settings, strata)
            for key, comparisons in results.items():
                for result in comparisons:
                    row = comparison_row(size, name, labels[key], result, images, left_out)
                    rows.append({**row, "main": labels[key] == main, "warning": warning})
    return rows


def comparison_row(
    size: int, task: str, metric: str, c: Comparison, images: int, left_out: int = 0
) -> dict[str, Any]:
    """One row of a comparison table (see :data:`COMPARISON_COLUMNS`)."""
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
        "p": c.p_value,
        "method": c.method,
        "seed variance": c.seed_variance,
        "images": images,
        "images left out": left_out,
    }


# Each arm against the reference: values, intervals, the difference and its verdicts.
DIFFERENCE_COLUMNS = [
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
    "verdict unadjusted",
    "p",
    "p adjusted",
    "adjustment",
    "method",
    "seed variance",
]
COMPARISON_COLUMNS = [
    "size",
    "task",
    "metric",
    *DIFFERENCE_COLUMNS,
    "main",
    "images",
    "images left out",
    "warning",
]


def comparison_table(arms: Sequence[Arm], choice: RecordsChoice) -> pd.DataFrame:
    """Every arm after the first against the first, per eval size, task and metric.

    Rows: one per (size, task, metric, arm): the reference's and the arm's mean over seeds,
    std over seeds and interval; the difference (arm − reference) with its interval; the
    raw and the adjusted p-value and verdict (the family: each task's main metric and the
    global loss at the largest eval size, :func:`adjust_comparisons`); the images compared
    and those left out (not in every run's records). The ``global`` loss is the sum of the
    task losses. Empty when a run has no records. ``attrs["notes"]`` names every task or
    size left out; ``attrs["family"]`` the family.
    """
    if not choice.resolved:
        choice = resolve_choice(choice, [(r.path, r.config) for arm in arms for r in arm.runs])
    records, missing = arm_records(arms, choice.checkpoint, choice.split)
    if missing or len(arms) < 2:
        return pd.DataFrame(columns=COMPARISON_COLUMNS)
    notes: list[str] = []
    rows = comparison_rows(
        [a.name for a in arms],
        records,
        _first_config(arms),
        choice.bootstrap,
        choice.min_images,
        notes,
    )
    table = adjust_comparisons(pd.DataFrame(rows), choice)
    table.attrs["notes"] = notes
    return table


def family_name(size: int, fractions: bool = False) -> str:
    """The declared family of a comparison (or of a study, over its label fractions)."""
    over = " × label fractions" if fractions else ""
    return f"main metric per task and global loss @ {size} px{over}"


def adjust_comparisons(
    table: pd.DataFrame, choice: RecordsChoice, fractions: bool = False
) -> pd.DataFrame:
    """Adjusts the family of a comparison or study table together (see
    :mod:`ssl_mt.compare.multiplicity`): the ``main`` rows at the largest eval size."""
    columns = COMPARISON_COLUMNS if not fractions else ["fraction", *COMPARISON_COLUMNS]
    if table.empty:
        return pd.DataFrame(columns=columns)
    size = max(table["size"])
    primary = (table["size"] == size) & table["main"].astype(bool)
    if "reference" in table.columns:
        primary &= table["arm"] != table["reference"]
    name = family_name(size, fractions)
    adjusted = apply_family(
        table, primary, name, choice.multiplicity, choice.bootstrap.alpha
    ).reindex(columns=columns)
    adjusted.attrs["family"] = name
    adjusted.attrs["family size"] = int(primary.sum())
    return adjusted


def verdict_table(comparisons: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Per task, its main metric at the largest eval size, then the global loss: one row per
    (task, arm) with ``reference ± std``, ``arm ± std``, ``Δ [interval]`` and the verdict."""
    if comparisons.empty:
        return pd.DataFrame()
    size = max(comparisons["size"])
    at_size = comparisons[comparisons["size"] == size]
    rows = []
    for (task, _), part in at_size.groupby(["task", "arm"], sort=False):
        main = part[part["main"].astype(bool)]
        row = (main if not main.empty else part).iloc[0]
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
        f"{row['reference']} (reference)": mean_std(row["reference value"], row["reference std"]),
        "arm": row["arm"],
        "arm value": mean_std(row["value"], row["std"]),
        f"Δ [{confidence:.0%} interval]": _difference(row),
        "p": format_p(row.get("p")),
        "p adj.": format_p(row.get("p adjusted")),
        "verdict": row["verdict"] + (" ⚠" if row.get("warning") else ""),
    }


def format_p(value: Any) -> str:
    """A p-value for a table: 3 decimals, ``<0.001``, or ``—`` when there is none."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.3f}" if value >= 0.001 else "<0.001"


def mean_std(value: float, std: float) -> str:
    """``value ± std`` (the value alone when the std is NaN: one seed)."""
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
    if not choice.resolved:
        choice = resolve_choice(choice, [(run, read_config(run)) for c in cells for run in c.runs])
    arms = sorted({c.arm for c in cells})
    if reference is None:  # the random-init arm when there is one
        reference = DEFAULT_REFERENCE if DEFAULT_REFERENCE in arms else arms[0]
    if reference not in arms:
        raise CompareError(f"reference arm {reference!r} is not in the study (arms: {arms})")
    order = [reference, *[a for a in arms if a != reference]]
    rows = []
    notes: list[str] = []
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
        here_notes: list[str] = []
        for row in comparison_rows(
            names, per_arm, config, choice.bootstrap, choice.min_images, here_notes
        ):
            rows.append({"fraction": fraction, **row})
        notes += [f"{fraction:g}% labels: {note}" for note in here_notes]
    table = adjust_comparisons(pd.DataFrame(rows), choice, fractions=True)
    table.attrs["reference"] = reference
    table.attrs["notes"] = notes
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
        main = part[part["main"].astype(bool)]
        main_metric = (main if not main.empty else part)["metric"].iloc[0]
        for row in part[part["metric"] == main_metric].sort_values("fraction").to_dict("records"):
            rows.append(
                _verdict_cells(row, {"task": task}, confidence, {"labels": f"{row['fraction']:g}%"})
            )
    summary = pd.DataFrame(rows)
    summary.attrs["size"] = size
    return summary
