"""The base of every loss weighting strategy: validation and stacking of the per-task mappings.

Subclasses implement :meth:`LossWeighting._combine` on stacked ``(T,)`` tensors; the
interface they share is described in :mod:`ssl_mt.losses.weighting`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn


def check_positive(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value}.")
    return value


def check_task_values(
    what: str, task_names: Sequence[str], values: Mapping[str, float] | None, default: float
) -> list[float]:
    """Per-task values in ``task_names`` order; ``ValueError`` for names that are not tasks."""
    values = {} if values is None else dict(values)
    unknown = sorted(set(values) - set(task_names))
    if unknown:
        raise ValueError(
            f"{what} names unknown task(s) {unknown}; the tasks are {list(task_names)}."
        )
    return [float(values.get(name, default)) for name in task_names]


class LossWeighting(nn.Module):
    """Base class. Combines per-task losses into the total loss that is backpropagated.

    Subclasses implement :meth:`_combine` on stacked tensors; this class validates and stacks the
    per-task mappings in the fixed order of ``task_names``.

    Args:
        task_names: Names of the tasks, in a fixed order (the order of every per-task buffer).
        base_weights: Static weight per task (default 1.0 for tasks not named). ``fixed`` uses
            them as its weights; the adaptive strategies multiply their weight by them.

    Raises:
        ValueError: If ``task_names`` is empty or has duplicates, or ``base_weights`` names an
            unknown task or holds a weight that is not positive and finite.
    """

    def __init__(
        self, task_names: Sequence[str], base_weights: Mapping[str, float] | None = None
    ) -> None:
        super().__init__()
        if isinstance(task_names, str):
            raise ValueError(
                f"task_names must be a sequence of names, got the string {task_names!r}."
            )
        names = tuple(task_names)
        if not names:
            raise ValueError("task_names is empty: at least one task is needed.")
        if not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"task_names must be non-empty strings, got {list(names)}.")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"task_names has duplicate name(s) {duplicates}.")
        self.task_names: tuple[str, ...] = names
        weights = check_task_values("base_weights", names, base_weights, 1.0)
        for name, w in zip(names, weights, strict=True):
            check_positive(f"base_weights[{name!r}]", w)
        # Not persistent: the config decides the base weights, a checkpoint must not override them.
        self.register_buffer(
            "base_weights", torch.tensor(weights, dtype=torch.float32), persistent=False
        )

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def extra_repr(self) -> str:
        return f"tasks={list(self.task_names)}"

    def forward(
        self, losses: Mapping[str, Tensor], present: Mapping[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Combine the task losses of one batch.

        Args:
            losses: Scalar loss per task; exactly 0.0 (and still attached to the graph) when the
                batch has no label for that task.
            present: 0-dim bool tensor per task, True when at least one sample of the batch is
                labeled for the task.

        Returns:
            The total loss (0-dim) and the effective weight of each task as detached 0-dim
            tensors, for logging. For a present task the effective weight is
            ``d total / d losses[name]``; for an absent task it is the weight the strategy would
            apply (FAMO, whose weight depends on the batch's loss, reports 0).

        Raises:
            ValueError: If a mapping misses a task or names an unknown one, or a loss is not 0-dim.
        """
        for what, mapping in (("losses", losses), ("present", present)):
            if set(mapping) != set(self.task_names):
                missing = sorted(set(self.task_names) - set(mapping))
                unknown = sorted(set(mapping) - set(self.task_names))
                raise ValueError(
                    f"{what} must have exactly one entry per task {list(self.task_names)}; "
                    f"missing {missing}, unknown {unknown}."
                )
        for name in self.task_names:
            if losses[name].dim() != 0:
                raise ValueError(
                    f"losses[{name!r}] must be a 0-dim tensor, got shape {tuple(losses[name].shape)}."
                )
        stacked = torch.stack([losses[name] for name in self.task_names])
        stacked = stacked.to(torch.promote_types(stacked.dtype, torch.float32))
        mask = torch.stack(
            [
                torch.as_tensor(present[name], dtype=torch.bool, device=stacked.device).reshape(())
                for name in self.task_names
            ]
        )
        total, weights = self._combine(stacked, mask)
        weights = weights.detach()
        return total, {name: weights[i] for i, name in enumerate(self.task_names)}

    def _combine(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        """Total loss and effective weights from stacked ``(T,)`` losses and bool presence."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _combine.")

    def epoch_end(self, epoch_losses: Mapping[str, float]) -> None:
        """Called once per training epoch with each task's mean training loss over the epoch.

        The losses are already reduced over DDP ranks. Default: no-op.

        Args:
            epoch_losses: Mean training loss per task; tasks without labels in the epoch may be
                left out.
        """
        del epoch_losses

    @staticmethod
    def _masked_sum(values: Tensor, present: Tensor) -> Tensor:
        """Sum of ``values`` over present tasks; exactly 0.0 (still in the graph) when none are.

        ``torch.where`` rather than a multiplication: the gradient of an absent task is exactly
        zero and a non-finite value of an absent task cannot leak into the total.
        """
        return torch.where(present, values, torch.zeros_like(values)).sum()
