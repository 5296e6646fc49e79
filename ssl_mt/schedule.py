"""Progressive-resolution schedule: stages of (image size, epochs, batch size, aug strength)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


class ScheduleError(ValueError):
    """The schedule config cannot be run; the message names the stage and key."""


@dataclass(frozen=True)
class Stage:
    """One stage of training at a fixed image size.

    Attributes:
        size: Square training image side in pixels.
        epochs: Number of epochs spent in this stage.
        batch_size: Per-device batch size in this stage.
        aug_strength: Multiplier of the augmentation magnitudes in this stage.
    """

    size: int
    epochs: int
    batch_size: int
    aug_strength: float = 1.0


class ResolutionSchedule:
    """The ordered stages of a run and the epoch at which each begins.

    Args:
        stages: Stage mappings (``size``, ``epochs``, ``batch_size``, optional ``aug_strength``).
        size_multiple: Every size must be a multiple of this (the encoder's output stride:
            a U-Net decoder concatenates skip connections that must align).
    """

    def __init__(self, stages: Iterable[Mapping[str, Any]], size_multiple: int = 32) -> None:
        allowed = {"size", "epochs", "batch_size", "aug_strength"}
        parsed = []
        for i, stage in enumerate(stages):
            stage = dict(stage)
            unknown = set(stage) - allowed
            if unknown:
                raise ScheduleError(
                    f"schedule.stages[{i}]: unknown key(s) {sorted(unknown)}; allowed {sorted(allowed)}"
                )
            missing = {"size", "epochs", "batch_size"} - set(stage)
            if missing:
                raise ScheduleError(f"schedule.stages[{i}]: missing {sorted(missing)}")
            size, epochs, batch = int(stage["size"]), int(stage["epochs"]), int(stage["batch_size"])
            if epochs < 1:
                raise ScheduleError(f"schedule.stages[{i}].epochs must be >= 1, got {epochs}")
            if batch < 1:
                raise ScheduleError(f"schedule.stages[{i}].batch_size must be >= 1, got {batch}")
            if size < size_multiple or size % size_multiple:
                fix = max(size_multiple, round(size / size_multiple) * size_multiple)
                raise ScheduleError(
                    f"schedule.stages[{i}].size={size}: the encoder needs a multiple of "
                    f"{size_multiple} (e.g. {fix})"
                )
            strength = float(stage.get("aug_strength", 1.0))
            if strength < 0:
                raise ScheduleError(f"schedule.stages[{i}].aug_strength must be >= 0")
            parsed.append(Stage(size, epochs, batch, strength))
        if not parsed:
            raise ScheduleError("schedule.stages is empty: at least one stage is needed")
        self.stages: tuple[Stage, ...] = tuple(parsed)
        self.starts: tuple[int, ...] = tuple(
            sum(s.epochs for s in self.stages[:i]) for i in range(len(self.stages))
        )

    @property
    def total_epochs(self) -> int:
        return self.starts[-1] + self.stages[-1].epochs

    def index_at(self, epoch: int) -> int:
        """Index of the stage that trains ``epoch`` (0-based); the last stage after the end."""
        for i in reversed(range(len(self.stages))):
            if epoch >= self.starts[i]:
                return i
        return 0

    def stage_at(self, epoch: int) -> Stage:
        return self.stages[self.index_at(epoch)]

    def switch_epochs(self) -> list[int]:
        """Epochs at which a new stage (a new size) begins, excluding epoch 0."""
        return list(self.starts[1:])

    def optimizer_steps(self, n_train: int, world_size: int, accumulate: int) -> list[int]:
        """Optimiser steps in each stage, with ``drop_last`` batching on every rank.

        The train loaders shard with a ``drop_last`` ``DistributedSampler``: every rank gets
        ``n_train // world_size`` samples (not the ceiling, which pads by repeating samples).
        """
        steps = []
        for stage in self.stages:
            per_rank = n_train // world_size
            batches = per_rank // stage.batch_size
            steps.append(stage.epochs * math.ceil(batches / accumulate))
        return steps
