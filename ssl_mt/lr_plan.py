"""The learning-rate plan of a run: global-batch scaling, warmup, cosine, stage factors.

- The learning rate follows the GLOBAL batch size (devices × nodes × per-device batch ×
  accumulation): ``linear`` (base × B / 256, Goyal et al. 2017) or ``sqrt`` (base × √B,
  SimCLR's rule for LARS with large batches).
- Linear warmup, then cosine decay, stepped per optimiser step; a progressive-resolution
  stage with another batch size rescales the lr by the same rule.
- The plan comes from the config, the checkpoint gives only the position in it: a run resumed
  with more epochs, other devices or batch sizes follows the plan of its current config from
  the same point of training on (:class:`PlannedLR`), and the log names what changed.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only

from ssl_mt.schedule import ResolutionSchedule

log = logging.getLogger(__name__)

LR_RULES = ("linear", "sqrt", "none")


def scaled_lr(base_lr: float, global_batch: int, rule: str, reference_batch: int = 256) -> float:
    """Learning rate for a global batch size under a scaling rule.

    Args:
        base_lr: The rule's base rate.
        global_batch: devices × nodes × per-device batch × gradient accumulation.
        rule: ``linear`` (base × B / reference), ``sqrt`` (base × √B) or ``none`` (base).
        reference_batch: Batch size at which ``linear`` gives ``base_lr``.
    """
    if global_batch < 1:
        raise ValueError(f"global batch size must be >= 1, got {global_batch}")
    if rule == "linear":
        return base_lr * global_batch / reference_batch
    if rule == "sqrt":
        return base_lr * math.sqrt(global_batch)
    if rule == "none":
        return base_lr
    raise ValueError(f"optim.lr_scaling must be one of {LR_RULES}, got {rule!r}")


@dataclass
class WarmupCosine:
    """Multiplier of each group's lr at an optimiser step: warmup, cosine, stage factors.

    Picklable (a dataclass, not a lambda), so ``LambdaLR`` checkpoints it.

    Attributes:
        total_steps: Optimiser steps of the whole run.
        warmup_steps: Linear warmup from 0 over this many steps.
        min_ratio: Final lr as a fraction of the peak.
        stage_starts: Step at which each progressive-resolution stage begins.
        stage_factors: lr factor of each stage (batch-size rescaling), same length.
        frozen_steps: Steps during which groups tagged ``backbone`` get lr 0.
        frozen: Whether this multiplier belongs to a frozen (``backbone``) group.
        epoch_starts: Step at which each epoch begins, then the total (epochs + 1 values):
            where a resumed run stands in a plan built for other epochs, devices or batches.
    """

    total_steps: int
    warmup_steps: int = 0
    min_ratio: float = 0.0
    stage_starts: tuple[int, ...] = (0,)
    stage_factors: tuple[float, ...] = (1.0,)
    frozen_steps: int = 0
    frozen: bool = False
    epoch_starts: tuple[int, ...] = ()

    def __call__(self, step: int) -> float:
        if self.frozen and step < self.frozen_steps:
            return 0.0
        if step < self.warmup_steps:
            base = (step + 1) / self.warmup_steps
        else:
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            base = self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        factor = self.stage_factors[0]
        for start, stage_factor in zip(self.stage_starts, self.stage_factors, strict=True):
            if step >= start:
                factor = stage_factor
        return base * factor


# What a changed config can change in a plan, as the log names it.
_PLAN_FIELDS = {
    "total_steps": "total steps",
    "warmup_steps": "warmup steps",
    "stage_starts": "stage starts",
    "stage_factors": "stage lr factors",
    "min_ratio": "final lr ratio",
    "frozen_steps": "frozen-backbone steps",
}


class PlannedLR(torch.optim.lr_scheduler.LambdaLR):
    """torch's ``LambdaLR`` whose plan is the config's, restored only as a position.

    ``LambdaLR.load_state_dict`` restores the multipliers' fields, and the optimiser's state
    its groups' lrs, over the ones just built: a run resumed with a changed config would
    follow the old plan (a cosine already at its end, stage factors at stale steps, the
    peak lr of another global batch). Here loading keeps the plan and peak lrs built from
    the current config and restores the step; the resumed step is placed in the new plan
    at the same epoch (and fraction of it), which is the same step when the steps per epoch
    did not change, and every group's lr is set for it. A resume without a config change
    gives exactly the lrs the uninterrupted run has.

    Args:
        optimizer: Groups with ``initial``/current ``lr`` = peak lr × the group's lr scale.
        multipliers: One plan per group (:class:`WarmupCosine`).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, multipliers: Sequence[WarmupCosine]):
        # Plan step = scheduler step + offset; non-zero after a resume into a plan with
        # other steps per epoch.
        self.step_offset = 0
        super().__init__(optimizer, list(multipliers))

    def get_lr(self) -> list[float]:
        step = self.last_epoch + self.step_offset
        return [base * fn(step) for base, fn in zip(self.base_lrs, self.lr_lambdas, strict=True)]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        fresh = [dict(fn.__dict__) for fn in self.lr_lambdas]
        fresh_base = list(self.base_lrs)
        saved = [dict(d or {}) for d in state_dict.get("lr_lambdas", [])]
        saved_base = list(state_dict.get("base_lrs", fresh_base))
        saved_position = int(state_dict["last_epoch"]) + int(state_dict.get("step_offset", 0))
        super().load_state_dict(state_dict)
        for fn, values in zip(self.lr_lambdas, fresh, strict=True):
            fn.__dict__.clear()
            fn.__dict__.update(values)
        self.base_lrs = fresh_base
        old_epochs = tuple(saved[0].get("epoch_starts", ())) if saved else ()
        position = same_progress(saved_position, old_epochs, tuple(fresh[0]["epoch_starts"]))
        self.step_offset = position - self.last_epoch
        lrs = self.get_lr()
        for group, base, lr in zip(self.optimizer.param_groups, self.base_lrs, lrs, strict=True):
            group["initial_lr"], group["lr"] = base, lr
        self._last_lr = lrs
        changes = plan_changes(saved[0] if saved else {}, fresh[0])
        names = [str(g.get("name") or i) for i, g in enumerate(self.optimizer.param_groups)]
        changes += [
            f"peak lr {name} {old:.6g} -> {new:.6g}"
            for name, old, new in zip(names, saved_base, fresh_base, strict=False)
            if not math.isclose(old, new, rel_tol=1e-12)
        ]
        if position != saved_position:
            changes.append(f"position step {saved_position} -> {position} of the new plan")
        if changes and rank_zero_only.rank == 0:
            log.info(
                "lr plan rebuilt from the config at step %d: %s",
                self.last_epoch,
                "; ".join(changes),
            )


def plan_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs between two plans' fields, in words (``total steps 40 -> 80``)."""

    def shown(value: Any) -> Any:
        return list(value) if isinstance(value, tuple | list) else value

    return [
        f"{label} {shown(old[key])} -> {shown(new[key])}"
        for key, label in _PLAN_FIELDS.items()
        if key in old and shown(old[key]) != shown(new[key])
    ]


def same_progress(step: int, old_epochs: Sequence[int], new_epochs: Sequence[int]) -> int:
    """The step of the new plan at the point of training that ``step`` is in the old one.

    Args:
        step: A step of the old plan.
        old_epochs: The old plan's ``epoch_starts``; empty when unknown (the step is kept).
        new_epochs: The new plan's ``epoch_starts``.
    """
    if not old_epochs or not new_epochs or tuple(old_epochs) == tuple(new_epochs):
        return step
    epoch = min(bisect.bisect_right(old_epochs, step) - 1, len(old_epochs) - 1)
    if epoch >= len(new_epochs) - 1:  # past the new plan's end
        return new_epochs[-1] + step - old_epochs[epoch]
    if epoch == len(old_epochs) - 1:  # the old plan's end: the next epoch begins
        return new_epochs[epoch] + step - old_epochs[epoch]
    old_span = old_epochs[epoch + 1] - old_epochs[epoch]
    new_span = new_epochs[epoch + 1] - new_epochs[epoch]
    done = (step - old_epochs[epoch]) / max(1, old_span)
    return new_epochs[epoch] + round(done * new_span)


def lambda_scheduler(optimizer: torch.optim.Optimizer, schedule: WarmupCosine) -> PlannedLR:
    """A :class:`PlannedLR` with one multiplier per group; ``backbone`` groups honour freezing."""
    lambdas = [
        WarmupCosine(**{**schedule.__dict__, "frozen": group.get("tag") == "backbone"})
        for group in optimizer.param_groups
    ]
    return PlannedLR(optimizer, lambdas)


def trainer_world(trainer: Any) -> tuple[int, int]:
    """(number of processes, gradient accumulation) of a Lightning trainer."""
    return max(1, trainer.world_size), max(1, int(trainer.accumulate_grad_batches))


def plan_lr(
    cfg: Mapping[str, Any],
    schedule: ResolutionSchedule,
    n_train: int,
    world_size: int,
    accumulate: int,
    freeze_epochs: int = 0,
) -> tuple[float, WarmupCosine]:
    """Peak lr and per-step multiplier for a whole (possibly progressive) run.

    The peak lr follows the first stage's global batch; a later stage with another batch
    size multiplies it by the ratio the same scaling rule gives.

    Args:
        cfg: The ``optim`` config (``base_lr``, ``lr_scaling``, ``reference_batch``,
            ``warmup_epochs``, ``min_lr_ratio``).
        schedule: The run's stages.
        n_train: Training samples (before sharding across ranks).
        world_size: Processes (devices × nodes).
        accumulate: Gradient accumulation steps.
        freeze_epochs: Epochs during which ``backbone`` groups get lr 0.
    """
    rule, reference = cfg["lr_scaling"], cfg.get("reference_batch", 256)
    batches = [s.batch_size * world_size * accumulate for s in schedule.stages]
    lr = scaled_lr(cfg["base_lr"], batches[0], rule, reference)
    factors = tuple(
        scaled_lr(1.0, b, rule, reference) / scaled_lr(1.0, batches[0], rule, reference)
        for b in batches
    )
    steps = schedule.optimizer_steps(n_train, world_size, accumulate)
    starts = tuple(sum(steps[:i]) for i in range(len(steps)))
    per_epoch = [n / s.epochs for n, s in zip(steps, schedule.stages, strict=True)]
    epoch_steps = [n // s.epochs for n, s in zip(steps, schedule.stages, strict=True)]
    epoch_starts = tuple(
        itertools.accumulate(
            (n for n, s in zip(epoch_steps, schedule.stages, strict=True) for _ in range(s.epochs)),
            initial=0,
        )
    )

    def steps_until(epoch: float) -> int:
        total, remaining = 0.0, epoch
        for stage, rate in zip(schedule.stages, per_epoch, strict=True):
            take = min(remaining, stage.epochs)
            total += take * rate
            remaining -= take
        return math.ceil(total)

    total = max(1, sum(steps))
    warmup = min(steps_until(float(cfg.get("warmup_epochs", 0))), total)
    multiplier = WarmupCosine(
        total_steps=total,
        warmup_steps=warmup,
        min_ratio=float(cfg.get("min_lr_ratio", 0.0)),
        stage_starts=starts,
        stage_factors=factors,
        frozen_steps=steps_until(float(freeze_epochs)),
        epoch_starts=epoch_starts,
    )
    return lr, multiplier
