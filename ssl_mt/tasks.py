"""Task declarations: what each column of ``labels.csv`` means and which head learns it.

Tasks come from ``conf/tasks/*.yaml``. Each entry names a csv column, a kind
(``segmentation`` or ``classification``), class names for classification, a loss weight and
the metrics to report. Adding or removing a task is a config change plus a csv column.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

TaskKind = Literal["segmentation", "classification"]

SEGMENTATION_METRICS = ("iou", "dice")
CLASSIFICATION_METRICS = ("top1", "top5", "f1")
_KNOWN_KEYS = {"kind", "column", "classes", "loss_weight", "label_smoothing", "metrics"}


class TaskConfigError(ValueError):
    """A task declaration in ``conf/tasks`` is malformed."""


@dataclass(frozen=True)
class TaskSpec:
    """One task of the multi-task model.

    Attributes:
        name: Task name, used in metric keys (``val/224/<name>/loss``).
        kind: ``segmentation`` (a binary mask per image) or ``classification``.
        column: Column of ``labels.csv`` holding the label (a mask path or a class).
        classes: Class names, in index order (classification only).
        loss_weight: Weight of the task loss under ``fixed`` weighting.
        label_smoothing: Cross-entropy label smoothing (classification only).
        metrics: Metric names to compute for this task.
    """

    name: str
    kind: TaskKind
    column: str
    classes: tuple[str, ...] = ()
    loss_weight: float = 1.0
    label_smoothing: float = 0.0
    metrics: tuple[str, ...] = field(default=())

    @property
    def num_classes(self) -> int:
        """Number of output channels of the task's head (1 for binary segmentation)."""
        return len(self.classes) if self.kind == "classification" else 1

    @property
    def is_segmentation(self) -> bool:
        return self.kind == "segmentation"

    def class_index(self, value: str) -> int:
        """Parses one csv cell (an index or a class name) into a class index.

        Raises:
            ValueError: The value is neither a valid index nor a known class name.
        """
        text = value.strip()
        if text in self.classes:
            return self.classes.index(text)
        try:
            number = float(text)
        except ValueError:
            raise ValueError(
                f"unknown class {text!r} for task {self.name!r} "
                f"(expected an index 0..{len(self.classes) - 1} or one of {list(self.classes)})"
            ) from None
        if not number.is_integer() or not 0 <= number < len(self.classes):
            raise ValueError(
                f"class index {text!r} out of range for task {self.name!r} "
                f"(expected 0..{len(self.classes) - 1})"
            )
        return int(number)


def parse_tasks(config: Mapping[str, Any]) -> list[TaskSpec]:
    """Builds task specs from the ``tasks`` config group.

    Args:
        config: Mapping of task name to its declaration (a DictConfig works).

    Raises:
        TaskConfigError: naming the task and key that is wrong.
    """
    if not config:
        raise TaskConfigError("no tasks configured: `tasks` is empty")
    specs = []
    for name, entry in config.items():
        if entry is None:  # `tasks.skin=null` switches a task off
            continue
        entry = dict(entry)
        unknown = set(entry) - _KNOWN_KEYS
        if unknown:
            raise TaskConfigError(
                f"tasks.{name}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_KNOWN_KEYS)}"
            )
        kind = entry.get("kind")
        if kind not in ("segmentation", "classification"):
            raise TaskConfigError(
                f"tasks.{name}.kind must be 'segmentation' or 'classification', got {kind!r}"
            )
        classes = tuple(str(c) for c in entry.get("classes") or ())
        if kind == "classification" and len(classes) < 2:
            raise TaskConfigError(f"tasks.{name}.classes needs at least two class names")
        if kind == "segmentation" and classes:
            raise TaskConfigError(
                f"tasks.{name}: segmentation tasks are binary masks and take no `classes`"
            )
        if len(set(classes)) != len(classes):
            raise TaskConfigError(f"tasks.{name}.classes has duplicate names: {list(classes)}")
        allowed = SEGMENTATION_METRICS if kind == "segmentation" else CLASSIFICATION_METRICS
        metrics = tuple(entry.get("metrics") or allowed)
        bad = [m for m in metrics if m not in allowed]
        if bad:
            raise TaskConfigError(
                f"tasks.{name}.metrics: unknown {bad} for a {kind} task; choose from {allowed}"
            )
        weight = float(entry.get("loss_weight", 1.0))
        if weight < 0:
            raise TaskConfigError(f"tasks.{name}.loss_weight must be >= 0, got {weight}")
        smoothing = float(entry.get("label_smoothing", 0.0))
        if not 0.0 <= smoothing < 1.0:
            raise TaskConfigError(
                f"tasks.{name}.label_smoothing must be in [0, 1), got {smoothing}"
            )
        specs.append(
            TaskSpec(
                name=str(name),
                kind=kind,
                column=str(entry.get("column", name)),
                classes=classes,
                loss_weight=weight,
                label_smoothing=smoothing,
                metrics=metrics,
            )
        )
    if not specs:
        raise TaskConfigError("every task is switched off: at least one task is needed")
    return specs
