"""Which records a comparison reads: a checkpoint never judged on the images that chose it.

A run's ``best`` checkpoint is the one whose monitored metric (``callbacks.checkpoint.monitor``,
``val/<size>/global/loss`` by default) was best: it was chosen *on the val split*, so its
val metrics are optimistic, and more so for the arm whose curve is noisier. The default
(``auto``) therefore compares ``best`` on the ``test`` split when every run has test records,
else the ``last`` checkpoint on ``val`` (chosen by no metric), and says so in one line.
Asking for ``best`` on the split that chose it is refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ssl_mt.compare.keys import _select
from ssl_mt.compare.run import CompareError
from ssl_mt.compare.statistics import BootstrapSettings
from ssl_mt.evaluation.records import RECORDS_DIR

AUTO = "auto"
CHECKPOINT_CHOICES = (AUTO, "best", "last")
SPLIT_CHOICES = (AUTO, "val", "test")
MONITOR_KEY = "callbacks.checkpoint.monitor"


@dataclass(frozen=True)
class RecordsChoice:
    """Which records are compared and how (``conf/compare.yaml``).

    Attributes:
        checkpoint: ``auto``, ``best`` or ``last`` (``auto`` until :func:`resolve_choice`).
        split: ``auto``, ``val`` or ``test``.
        bootstrap: Bootstrap settings.
        multiplicity: How a family's p-values are adjusted (``holm``, ``fdr_bh``,
            ``bonferroni``: :mod:`ssl_mt.compare.multiplicity`).
        min_images: Below this many images of a task, its row carries a warning.
        reach: "Faster": the first epoch whose val loss is at most ``reach`` × the reference
            arm's final val loss (:mod:`ssl_mt.compare.claims`).
        note: How the checkpoint was chosen, in one line (set by :func:`resolve_choice`).
    """

    checkpoint: str
    split: str
    bootstrap: BootstrapSettings
    multiplicity: str = "holm"
    min_images: int = 30
    reach: float = 1.1
    note: str = ""

    @property
    def resolved(self) -> bool:
        return AUTO not in (self.checkpoint, self.split)

    @property
    def label(self) -> str:
        """``test split, best checkpoint (chosen on val)`` for headings."""
        return f"{self.split}/{self.checkpoint}" + (f" ({self.note})" if self.note else "")


def selection_split(config: Mapping[str, Any]) -> str:
    """The split whose metric chose the run's ``best`` checkpoint (``val`` by default)."""
    monitor = _select(config, MONITOR_KEY)
    if isinstance(monitor, str) and "/" in monitor:
        return monitor.split("/", 1)[0]
    return "val"


def has_records(run_dir: Path, checkpoint: str, split: str) -> bool:
    return any((Path(run_dir) / RECORDS_DIR / checkpoint).glob(f"{split}_*.csv.gz"))


def resolve_choice(
    choice: RecordsChoice, runs: Sequence[tuple[Path, Mapping[str, Any]]]
) -> RecordsChoice:
    """Settles ``auto`` for these runs and refuses ``best`` on the split that chose it.

    Args:
        choice: The settings (``checkpoint`` / ``split`` may be ``auto``).
        runs: ``(run folder, config)`` of every run compared.

    Raises:
        CompareError: ``best`` asked for on the split its metric was chosen on, or on
            ``test`` without test records in every run.
    """
    chosen_on = sorted({selection_split(config) for _, config in runs}) or ["val"]
    test_everywhere = bool(runs) and all(has_records(path, "best", "test") for path, _ in runs)
    checkpoint, split = choice.checkpoint, choice.split
    if split == AUTO:
        if checkpoint == "best" and not test_everywhere:
            raise CompareError(
                "checkpoint=best needs a split that did not choose it: the best checkpoints "
                f"were chosen on {'/'.join(chosen_on)} and not every run has test records "
                "(add a test split to labels.csv, or use --checkpoint last)"
            )
        split = "test" if test_everywhere and "test" not in chosen_on else "val"
    if checkpoint == AUTO:
        checkpoint = "best" if split not in chosen_on else "last"
    if checkpoint == "best" and split in chosen_on:
        raise CompareError(
            f"checkpoint=best on the {split} split: the best checkpoints were chosen on "
            f"{split} ({MONITOR_KEY}), so their {split} metrics are optimistic. Compare them "
            "on a split that did not choose them (--split test) or compare the last "
            "checkpoints (--checkpoint last)"
        )
    if checkpoint == "best":
        note = f"best chosen on {'/'.join(chosen_on)}, judged on {split}"
    elif test_everywhere:
        note = "the last checkpoint of each run, chosen by no metric"
    else:
        note = (
            f"no test split: the last checkpoint, since best was chosen on "
            f"{'/'.join(chosen_on)} and would be judged on the images that chose it"
        )
    return replace(choice, checkpoint=checkpoint, split=split, note=note)
