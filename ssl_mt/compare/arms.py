"""Arms: groups of runs of one setup with different seeds; Hydra multirun folders.

A Hydra multirun folder (numbered subfolders, each a run) stands for all its runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ssl_mt.compare.run import METRICS_FILE, CompareError, Run, common_keys, load_run, unique_names
from ssl_mt.evaluation.records import RECORDS_DIR


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
