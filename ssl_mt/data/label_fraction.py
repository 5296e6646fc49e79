"""Fewer labels on the same images: a fixed subset of each task's labeled training samples.

Label-efficiency studies fine-tune with 5 %, 25 %, ... of the labels. The subset must be the
same for every arm and run seed (otherwise a difference between arms mixes in a difference
of labels) and nested (the 5 % labels are among the 25 % ones), so the images are ranked
once by a hash of (data seed, image path) and each task keeps the first labeled ones in
that order. The other samples keep their image, without that task's label; an image left
without any label is no use to fine-tuning, but pretraining still reads it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ssl_mt.data.manifest import Sample
from ssl_mt.tasks import TaskSpec


@dataclass(frozen=True)
class LabelCounts:
    """Labeled training samples of one task before and after the fraction is applied."""

    kept: int
    labeled: int


def _rank_key(seed: int, image: Path, root: Path) -> bytes:
    try:
        name = image.relative_to(root).as_posix()
    except ValueError:
        name = image.as_posix()
    return hashlib.sha1(f"{seed}:{name}".encode()).digest()


def keep_label_fraction(
    samples: Sequence[Sample],
    tasks: Sequence[TaskSpec],
    fraction: float,
    seed: int,
    root: Path,
) -> tuple[list[Sample], dict[str, LabelCounts]]:
    """Keeps ``fraction`` of each task's labeled samples; clears the other labels.

    Args:
        samples: Training samples.
        tasks: Tasks whose labels are thinned.
        fraction: Share in (0, 1] of each task's labeled samples to keep: round(fraction ×
            labeled), at least 1 when the task has any label.
        seed: Data seed of the ranking (not the run seed: every run sees the same labels).
        root: Dataset root; the ranking hashes image paths relative to it, so it does not
            depend on where the dataset lies.

    Returns:
        The samples in their order, with labels outside the subset set to None, and the
        counts per task.

    Raises:
        ValueError: ``fraction`` is not in (0, 1].
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"data.label_fraction must be in (0, 1], got {fraction}")
    order = sorted(range(len(samples)), key=lambda i: _rank_key(seed, samples[i].image, root))
    keep: dict[str, set[int]] = {}
    counts: dict[str, LabelCounts] = {}
    for task in tasks:
        labeled = [i for i in order if samples[i].labels.get(task.name) is not None]
        n_keep = min(len(labeled), max(1, round(fraction * len(labeled)))) if labeled else 0
        keep[task.name] = set(labeled[:n_keep])
        counts[task.name] = LabelCounts(kept=n_keep, labeled=len(labeled))
    thinned = []
    for i, sample in enumerate(samples):
        labels = {
            name: (label if name not in keep or i in keep[name] else None)
            for name, label in sample.labels.items()
        }
        thinned.append(replace(sample, labels=labels))
    return thinned, counts


def has_any_label(sample: Sample) -> bool:
    return any(label is not None for label in sample.labels.values())


def describe_counts(fraction: float, counts: dict[str, LabelCounts], dropped: int) -> str:
    """One log line: the labeled training samples per task, and the images left out."""
    per_task = ", ".join(f"{name} {c.kept}/{c.labeled}" for name, c in counts.items())
    return (
        f"data.label_fraction={fraction:g}: labeled train samples per task: {per_task}; "
        f"{dropped} train image(s) without any label left out of fine-tuning "
        "(pretraining still uses them)"
    )
