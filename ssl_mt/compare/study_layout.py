"""The folder layout of a label-efficiency study: ``<arm>/frac<PCT>/seed<S>/``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ssl_mt.compare.run import CompareError


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
