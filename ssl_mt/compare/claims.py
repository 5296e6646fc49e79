"""The claims about the val-loss curves, each a statistic with an interval over seeds and images.

The seed system claims that the SSL backbone makes fine-tuning (b) handle the resolution
change better, (c) converge faster and (d) more smoothly. Each is a statistic of a run's
validation-loss curve per task (and of the global loss, the sum over tasks), computed from
the per-image losses of every epoch (:mod:`ssl_mt.callbacks.curve_records`), so the same
paired, stratified bootstrap over images and the pooled seed variance
(:mod:`ssl_mt.compare.statistics`) give it an interval and a verdict:

- ``jump``: the val loss at the first epoch of a new stage minus at the last epoch before
  it, per switch (lower: the resolution change cost less);
- ``auc``: the mean val loss over the epochs, the area under the curve per epoch (lower:
  lower all along, i.e. faster);
- ``epochs_to_reach``: the epochs trained until the val loss first reaches ``reach`` × the
  reference arm's final val loss (interpolated between epochs; a curve that never reaches
  it counts as one epoch past the end); the target is fixed at the reference's point
  estimate (lower: faster);
- ``roughness``: the back-and-forth of the curve within the stages, ``(Σ|Δ| − |Σ Δ|)`` over
  each stage's epoch-to-epoch changes, per change: 0 for a curve that only goes down, so a
  fast descent is not counted as roughness, and the switch jumps are left to ``jump``
  (lower: smoother).

Each claim is its own declared family (every task and the global loss at the largest eval
size, every switch for the jump), adjusted as the main comparison is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ssl_mt.callbacks.curve_records import CURVES_DIR
from ssl_mt.compare.differences import DIFFERENCE_COLUMNS, comparison_row
from ssl_mt.compare.keys import AUC, GLOBAL, JUMP, REACH, ROUGHNESS, _order_tasks
from ssl_mt.compare.multiplicity import apply_family
from ssl_mt.compare.run import METRICS_FILE, CompareError, Switch, load_run, read_config
from ssl_mt.compare.selection import RecordsChoice
from ssl_mt.compare.statistics import bootstrap_functions, compare_draws, strata_of
from ssl_mt.compare.study_layout import StudyCell
from ssl_mt.evaluation.records import RECORDS_DIR

# The families of the claims, in report order: (claim, its statistics).
CLAIMS = (
    ("resolution change", (JUMP,)),
    ("faster", (AUC, REACH)),
    ("smoother", (ROUGHNESS,)),
)


# -- reading -----------------------------------------------------------------------------------------
def load_curves(run_dir: Path, split: str = "val") -> dict[int, pd.DataFrame]:
    """A run's curve records by eval size: ``epoch, image, task, loss`` ({} when none).

    Raises:
        CompareError: An unreadable file (named).
    """
    folder = Path(run_dir) / RECORDS_DIR / CURVES_DIR
    curves: dict[int, pd.DataFrame] = {}
    for size_dir in sorted(folder.glob(f"{split}_*")):
        size = size_dir.name[len(split) + 1 :]
        if not size.isdigit():
            continue
        frames = []
        for path in sorted(size_dir.glob("epoch*.csv.gz")):
            epoch = path.name[len("epoch") : -len(".csv.gz")]
            if not epoch.isdigit():
                continue
            try:
                table = pd.read_csv(path, dtype={"image": str, "task": str})
            except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError) as error:
                raise CompareError(
                    f"{path}: not a readable curve records file ({error})"
                ) from error
            if not {"image", "task", "loss"} <= set(table.columns):
                raise CompareError(f"{path}: needs the columns image, task, loss")
            table["loss"] = pd.to_numeric(table["loss"], errors="coerce")
            if table["loss"].isna().any():
                raise CompareError(f"{path}: a loss that is not a number")
            frames.append(table.assign(epoch=int(epoch)))
        if frames:
            curves[int(size)] = pd.concat(frames, ignore_index=True)
    return curves


# -- ingredients ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CurveData:
    """The curves of every run of every arm on common images and epochs.

    Attributes:
        arms: Per arm, ``(S, N, T·(E + 1))``: per task, the E epochs' losses of each image
            (0 where it is not labeled for the task) and a 1 where it is labeled.
        tasks: The T tasks, in column order.
        epochs: The E epochs common to every run.
        images: N.
        strata: Images labeled for the same tasks (the bootstrap's strata).
    """

    arms: list[np.ndarray]
    tasks: list[str]
    epochs: list[int]
    images: int
    strata: list[np.ndarray]

    def curve(self, sums: np.ndarray, task: str | None) -> np.ndarray:
        """The val-loss curve ``(..., E)`` of a task (None: the global loss) from sums."""
        width = len(self.epochs) + 1
        blocks = sums.reshape(*sums.shape[:-1], len(self.tasks), width)
        with np.errstate(divide="ignore", invalid="ignore"):
            curves = blocks[..., :-1] / blocks[..., -1:]
        if task is None:
            return curves.sum(axis=-2)
        return curves[..., self.tasks.index(task), :]


def curve_data(
    per_arm: Sequence[Sequence[pd.DataFrame]], tasks: Sequence[str]
) -> tuple[CurveData | None, list[str]]:
    """:class:`CurveData` of the runs' curves at one size, and what was left out.

    A task is kept when every run has it; an image of a task when every run has it at every
    common epoch.
    """
    notes: list[str] = []
    epochs = sorted(set.intersection(*[set(t["epoch"].unique()) for runs in per_arm for t in runs]))
    if len(epochs) < 2:
        return None, ["fewer than 2 epochs with curve records in common"]
    kept_tasks, labeled = [], {}
    for task in tasks:
        sets = []
        for runs in per_arm:
            for table in runs:
                rows = table[(table["task"] == task) & table["epoch"].isin(epochs)]
                counts = rows.groupby("image")["epoch"].nunique()
                sets.append(set(counts.index[counts == len(epochs)]))
        common = set.intersection(*sets) if sets else set()
        if not common:
            notes.append(f"{task}: no image with a val loss at every epoch in every run")
            continue
        left_out = len(set.union(*sets)) - len(common)
        if left_out:
            notes.append(f"{task}: {left_out} image(s) not in every run's curves left out")
        kept_tasks.append(task)
        labeled[task] = common
    if not kept_tasks:
        return None, notes
    images = sorted(set.union(*labeled.values()))
    position = {name: i for i, name in enumerate(images)}
    arms = []
    for runs in per_arm:
        seeds = []
        for table in runs:
            blocks = []
            for task in kept_tasks:
                block = np.zeros((len(images), len(epochs) + 1))
                rows = table[
                    (table["task"] == task)
                    & table["epoch"].isin(epochs)
                    & table["image"].isin(labeled[task])
                ]
                grid = rows.pivot_table(index="image", columns="epoch", values="loss")
                grid = grid.reindex(columns=epochs)
                where = [position[name] for name in grid.index]
                block[where, :-1] = grid.to_numpy(dtype=float)
                block[where, -1] = 1.0
                blocks.append(block)
            seeds.append(np.concatenate(blocks, axis=1))
        arms.append(np.stack(seeds))
    flags = arms[0][0][:, len(epochs) :: len(epochs) + 1] > 0
    return CurveData(arms, kept_tasks, epochs, len(images), strata_of(flags)), notes


# -- statistics of a curve ---------------------------------------------------------------------------
def jump_at(curves: np.ndarray, epochs: Sequence[int], switch: int) -> np.ndarray:
    """Loss at ``switch`` (first epoch of the new stage) minus at ``switch − 1``."""
    after, before = list(epochs).index(switch), list(epochs).index(switch - 1)
    return curves[..., after] - curves[..., before]


def area(curves: np.ndarray) -> np.ndarray:
    """The mean val loss over the epochs."""
    return curves.mean(axis=-1)


def roughness(curves: np.ndarray, epochs: Sequence[int], switches: Sequence[int]) -> np.ndarray:
    """``Σ (Σ|Δ| − |Σ Δ|)`` over the stages, per epoch-to-epoch change within a stage."""
    edges = [0, *[list(epochs).index(s) for s in switches if s in epochs], len(epochs)]
    excess = np.zeros(curves.shape[:-1])
    changes = 0
    for start, stop in pairwise(edges):
        steps = np.diff(curves[..., start:stop], axis=-1)
        if steps.shape[-1] == 0:
            continue
        excess += np.abs(steps).sum(axis=-1) - np.abs(steps.sum(axis=-1))
        changes += steps.shape[-1]
    return excess / max(changes, 1)


def epochs_to_reach(curves: np.ndarray, epochs: Sequence[int], target: float) -> np.ndarray:
    """Epochs trained until the curve first is ≤ ``target``, interpolated linearly between
    validated epochs (epoch e's validation comes after e + 1 epochs); one past the last
    epoch when never."""
    trained = np.asarray(epochs, dtype=float) + 1.0
    below = curves <= target
    first = below.argmax(axis=-1)
    reached = below.any(axis=-1)
    previous = np.maximum(first - 1, 0)
    take = lambda k: np.take_along_axis(curves, k[..., None], axis=-1)[..., 0]  # noqa: E731
    high, low = take(previous), take(first)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(high > low, (high - target) / (high - low), 1.0)
    value = trained[previous] + np.clip(share, 0.0, 1.0) * (trained[first] - trained[previous])
    value = np.where(first == 0, trained[0], value)
    return np.where(reached, value, trained[-1] + 1.0)


# -- comparison ----------------------------------------------------------------------------------------
def _functions(
    data: CurveData, task: str | None, switches: Sequence[Switch], target: float
) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    epochs = data.epochs
    starts = [s.epoch for s in switches]
    functions: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    for k, switch in enumerate(switches):
        if switch.epoch in epochs and switch.epoch - 1 in epochs:
            functions[f"{JUMP}#{k}"] = lambda s, e=switch.epoch: jump_at(
                data.curve(s, task), epochs, e
            )
    functions[AUC] = lambda s: area(data.curve(s, task))
    functions[REACH] = lambda s: epochs_to_reach(data.curve(s, task), epochs, target)
    functions[ROUGHNESS] = lambda s: roughness(data.curve(s, task), epochs, starts)
    return functions


def claim_rows(
    names: Sequence[str],
    per_arm: Sequence[Sequence[Mapping[int, pd.DataFrame]]],
    tasks: Sequence[str],
    switches: Sequence[Switch],
    choice: RecordsChoice,
    notes: list[str],
) -> list[dict[str, Any]]:
    """Rows of :func:`claims_table` (unadjusted)."""
    sizes = sorted(set.intersection(*[set(c) for runs in per_arm for c in runs]))
    rows = []
    for size in sizes:
        data, left = curve_data([[c[size] for c in runs] for runs in per_arm], tasks)
        notes += [f"claims @ {size} px: {line}" for line in left]
        if data is None:
            continue
        # One bootstrap for every task's statistics: one matrix product per arm serves all.
        functions: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
        targets: dict[str, float] = {}
        for task in [*data.tasks, None]:
            name = task or GLOBAL
            final = data.curve(data.arms[0].sum(axis=1), task)[:, -1]
            targets[name] = choice.reach * float(final.mean())
            for key, function in _functions(data, task, switches, targets[name]).items():
                functions[f"{name}|{key}"] = function
        draws = bootstrap_functions([(data.arms, functions)], choice.bootstrap, data.strata)
        for key, found in draws.items():
            task, _, statistic_key = key.partition("|")
            statistic, _, number = statistic_key.partition("#")
            switch = switches[int(number)] if number else None
            for comparison in compare_draws({statistic: found}, names, choice.bootstrap)[statistic]:
                row = comparison_row(size, task, statistic, comparison, data.images)
                rows.append(
                    {
                        "claim": next(c for c, stats in CLAIMS if statistic in stats),
                        "statistic": statistic,
                        "switch": f"{switch.label} at epoch {switch.epoch}" if switch else "",
                        "target": targets[task] if statistic == REACH else np.nan,
                        **row,
                    }
                )
    return rows


CLAIM_COLUMNS = [
    "claim",
    "statistic",
    "switch",
    "size",
    "task",
    "metric",
    "target",
    *DIFFERENCE_COLUMNS,
    "images",
]


def adjust_claims(table: pd.DataFrame, choice: RecordsChoice, over: str = "") -> pd.DataFrame:
    """Each claim's family (its statistics × tasks and global, × switches, at the largest
    size; ``over`` names what else it spans, e.g. label fractions) adjusted together."""
    if table.empty:
        return table.reindex(columns=CLAIM_COLUMNS)
    size = max(table["size"])
    parts = []
    for claim, statistics in CLAIMS:
        part = table[table["claim"] == claim]
        if part.empty:
            continue
        primary = (part["size"] == size) & (part["arm"] != part["reference"])
        name = f"{claim}: {', '.join(statistics)} per task and global loss @ {size} px{over}"
        parts.append(apply_family(part, primary, name, choice.multiplicity, choice.bootstrap.alpha))
    columns = [c for c in table.columns if c not in CLAIM_COLUMNS]
    return pd.concat(parts).reindex(columns=[*columns, *CLAIM_COLUMNS])


def runs_curves(run_dirs: Sequence[Sequence[Path]]) -> tuple[list[list[dict]], list[Path]]:
    """Per arm, per run, the curve records by size; and the runs that have none."""
    curves = [[load_curves(path) for path in runs] for runs in run_dirs]
    missing = [
        path
        for runs, found in zip(run_dirs, curves, strict=True)
        for path, c in zip(runs, found, strict=True)
        if not c
    ]
    return curves, missing


def claims_table(
    names: Sequence[str],
    run_dirs: Sequence[Sequence[Path]],
    config: Mapping[str, Any],
    switches: Sequence[Switch],
    choice: RecordsChoice,
) -> pd.DataFrame:
    """Every claim statistic, each arm against the first, per size, task (and switch).

    Args:
        names: Arm names, the reference first.
        run_dirs: Per arm, its runs (seeds).
        config: A run's config (the order of the tasks).
        switches: The resolution switches of the runs' schedule.
        choice: Bootstrap, multiplicity and ``reach`` settings.

    Returns:
        Empty when a run has no curve records (``attrs["missing"]`` names them); ``attrs
        ["notes"]`` names what was left out.
    """
    curves, missing = runs_curves(run_dirs)
    notes: list[str] = []
    if missing or len(names) < 2:
        table = pd.DataFrame(columns=CLAIM_COLUMNS)
    else:
        found = {t for runs in curves for c in runs for f in c.values() for t in f["task"].unique()}
        tasks = [t for t in _order_tasks(found, config) if t != GLOBAL]
        rows = claim_rows(names, curves, tasks, switches, choice, notes)
        table = adjust_claims(pd.DataFrame(rows), choice)
    table.attrs["missing"] = missing
    table.attrs["notes"] = notes
    return table


def study_claims(cells: Sequence[StudyCell], choice: RecordsChoice, reference: str) -> pd.DataFrame:
    """:func:`claims_table` per label fraction of a study, every arm against ``reference``,
    with a ``fraction`` column; each claim's family spans the tasks × the label fractions."""
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    missing: list[Path] = []
    for fraction in sorted({c.fraction for c in cells}):
        here = {c.arm: c for c in cells if c.fraction == fraction}
        if reference not in here or len(here) < 2:
            continue
        names = [reference, *sorted(a for a in here if a != reference)]
        run_dirs = [here[name].runs for name in names]
        curves, absent = runs_curves(run_dirs)
        if absent:
            missing += absent
            continue
        first = run_dirs[0][0]
        config = read_config(first)
        switches = load_run(first).switches if (first / METRICS_FILE).is_file() else []
        found = {t for runs in curves for c in runs for f in c.values() for t in f["task"].unique()}
        tasks = [t for t in _order_tasks(found, config) if t != GLOBAL]
        here_notes: list[str] = []
        for row in claim_rows(names, curves, tasks, switches, choice, here_notes):
            rows.append({"fraction": fraction, **row})
        notes += [f"{fraction:g}% labels: {note}" for note in here_notes]
    table = pd.DataFrame(rows)
    table = (
        adjust_claims(table, choice, " × label fractions")
        if not table.empty
        else pd.DataFrame(columns=["fraction", *CLAIM_COLUMNS])
    )
    table.attrs["missing"] = missing
    table.attrs["notes"] = notes
    return table
