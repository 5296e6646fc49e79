"""Reading fine-tuning runs: ``metrics.csv``, ``.hydra/config.yaml``, evaluation records.

A run is a folder written by ``python -m ssl_mt.finetune``; a Hydra multirun folder (numbered
subfolders, each a run) stands for all its runs. An *arm* is a group of runs of one setup
with different seeds. Conventions: epochs are the 0-based ``epoch`` column of
``metrics.csv``; a switch at epoch ``e`` means that epoch ``e`` is the first one trained at
the new size.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ssl_mt.evaluation.records import RECORDS_DIR, RecordsError, read_records

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.csv"
CONFIG_FILE = Path(".hydra") / "config.yaml"
GLOBAL = "global"
LOSS = "loss"
# Row order of the tables: the scores in this order, then any other metric, then the loss.
METRIC_ORDER = ("iou", "dice", "top1", "top5", "f1")
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


# -- arms, multirun folders, evaluation records ----------------------------------------------------
@dataclass
class Arm:
    """A group of runs of one setup (seeds).

    Attributes:
        name: Display name.
        runs: The runs (at least one).
    """

    name: str
    runs: list[Run]

    @property
    def seeds(self) -> int:
        return len(self.runs)


def as_arms(items: Sequence[Run | Arm]) -> list[Arm]:
    """Arms as given; a single run is an arm of one run with the run's name."""
    return [item if isinstance(item, Arm) else Arm(item.name, [item]) for item in items]


def is_run_dir(path: Path) -> bool:
    return (path / METRICS_FILE).is_file() or (path / RECORDS_DIR).is_dir()


def multirun_members(path: Path) -> list[Path]:
    """The runs of a Hydra multirun folder (numbered subfolders), in number order; else []."""
    if not path.is_dir() or is_run_dir(path):
        return []
    numbered = [p for p in path.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted((p for p in numbered if is_run_dir(p)), key=lambda p: int(p.name))


def expand_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run folders: each path itself, or every run of a multirun folder."""
    expanded: list[Path] = []
    for path in map(Path, paths):
        members = multirun_members(path)
        expanded += members if members else [path]
    return expanded


def parse_arm(spec: str) -> tuple[str, list[Path]]:
    """``NAME=DIR[,DIR...]`` → ``(NAME, [DIR, ...])`` (a DIR may be a multirun folder)."""
    name, sep, folders = spec.partition("=")
    paths = [p for p in folders.split(",") if p.strip()]
    if not sep or not name.strip() or not paths:
        raise CompareError(f"--arm {spec!r}: expected NAME=RUN_DIR[,RUN_DIR...]")
    return name.strip(), [Path(p.strip()) for p in paths]


def load_arms(specs: Sequence[tuple[str | None, Sequence[str | Path]]]) -> list[Arm]:
    """Loads arms given as ``(name or None, [run or multirun folder, ...])``.

    An arm without a name is named after its first run (unique among the arms). Its runs are
    named ``<arm>`` (one run) or ``<arm>#<k>`` (several), k from 1.

    Raises:
        CompareError: See :func:`load_run`; also no arm, an arm without runs, or no
            validation metric common to every run.
    """
    if not specs:
        raise CompareError("no run directory given")
    arms = []
    for name, paths in specs:
        folders = expand_runs(paths)
        if not folders:
            raise CompareError(f"arm {name!r}: no run folder given")
        runs = [load_run(p) for p in folders]
        arms.append(Arm(name if name is not None else runs[0].name, runs))
    for arm, name in zip(arms, unique_names(a.name for a in arms), strict=True):
        arm.name = name
        for k, run in enumerate(arm.runs, start=1):
            run.name = name if arm.seeds == 1 else f"{name}#{k}"
    common_keys([run for arm in arms for run in arm.runs])
    return arms


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


# -- label-efficiency studies ----------------------------------------------------------------------
@dataclass
class StudyCell:
    """The seeds of one arm at one label fraction.

    Attributes:
        arm: Arm name (the folder name).
        fraction: Label fraction in percent.
        runs: Seed folders (``seed<S>``), in seed order.
    """

    arm: str
    fraction: float
    runs: list[Path] = field(default_factory=list)


def load_study(study_dir: str | Path) -> list[StudyCell]:
    """The cells of ``STUDY_DIR/<arm>/frac<PCT>/seed<S>/`` (PCT: label fraction in percent).

    Raises:
        CompareError: No such folder, or no ``<arm>/frac<PCT>/seed<S>`` run below it, or a
            ``frac``/``seed`` folder whose name does not parse (named).
    """
    root = Path(study_dir)
    if not root.is_dir():
        raise CompareError(f"{root}: no such study folder")
    cells = []
    for arm_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for frac_dir in sorted(p for p in arm_dir.iterdir() if p.is_dir()):
            if not frac_dir.name.startswith("frac"):
                continue
            try:
                fraction = float(frac_dir.name[len("frac") :])
            except ValueError:
                raise CompareError(
                    f"{frac_dir}: expected frac<PCT> (label fraction in percent, e.g. frac025)"
                ) from None
            seeds = []
            for seed_dir in frac_dir.iterdir():
                if not seed_dir.is_dir():
                    continue
                number = seed_dir.name[len("seed") :]
                if not seed_dir.name.startswith("seed") or not number.isdigit():
                    raise CompareError(f"{seed_dir}: expected seed<S> (e.g. seed0)")
                seeds.append((int(number), seed_dir))
            if seeds:
                cells.append(StudyCell(arm_dir.name, fraction, [p for _, p in sorted(seeds)]))
    if not cells:
        raise CompareError(
            f"{root}: no runs laid out as <arm>/frac<PCT>/seed<S>/ (e.g. mt/frac005/seed0)"
        )
    return cells
