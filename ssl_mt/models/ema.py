"""Momentum (EMA) copies of online networks: MoCo's key encoder, BYOL's target, DINO's teacher.

After every optimiser step, ``target = m · target + (1 − m) · online`` for every parameter
and floating-point buffer (BatchNorm running statistics); integer buffers are copied. The
momentum ``m`` is constant (MoCo) or rises from ``base`` to ``final`` on a cosine over the
whole run (BYOL, DINO):

    m(k) = final − (final − base) · (cos(π k / K) + 1) / 2,   k = optimiser step, K = total

``k`` is ``trainer.global_step``, so a resumed run continues the schedule where it stopped.

- [0] MoCo, 2020, https://arxiv.org/abs/1911.05722 (momentum encoder, constant m)
- [1] BYOL, 2020, https://arxiv.org/abs/2006.07733 (Sec. 3.2, the cosine schedule)
- [2] DINO, 2021, https://arxiv.org/abs/2104.14294 (teacher EMA, the same schedule)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ssl_mt.models.ssl_base import SSLModule

SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class MomentumSchedule:
    """EMA momentum per optimiser step.

    Args:
        base: Momentum at step 0, in [0, 1).
        final: Momentum at the last step, in [base, 1] (``cosine`` only).
        schedule: ``cosine`` (base → final) or ``constant`` (base throughout).
    """

    base: float = 0.996
    final: float = 1.0
    schedule: str = "cosine"

    def __post_init__(self) -> None:
        if not 0.0 <= self.base < 1.0:
            raise ValueError(f"method.momentum.base must be in [0, 1), got {self.base}")
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"method.momentum.schedule must be one of {SCHEDULES}, got {self.schedule!r}"
            )
        if self.schedule == "cosine" and not self.base <= self.final <= 1.0:
            raise ValueError(
                f"method.momentum.final must be in [base, 1] = [{self.base}, 1], got {self.final}"
            )

    def __call__(self, step: int, total_steps: int) -> float:
        """Momentum of the update that follows optimiser step ``step`` (0-based)."""
        if self.schedule == "constant":
            return self.base
        progress = min(1.0, max(0, step) / max(1, total_steps))
        return self.final - (self.final - self.base) * (math.cos(math.pi * progress) + 1) / 2


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen copy of ``module`` (no gradients) to be updated by :func:`ema_update_`."""
    target = copy.deepcopy(module)
    for param in target.parameters():
        param.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``target ← momentum · target + (1 − momentum) · online``, in place.

    Parameters and floating-point buffers are averaged; integer buffers (BatchNorm's
    ``num_batches_tracked``) are copied. Both modules must have the same structure.
    """
    target_params = list(target.parameters())
    online_params = [p.detach() for p in online.parameters()]
    if len(target_params) != len(online_params):
        raise ValueError("EMA target and online modules differ in structure")
    torch._foreach_lerp_(target_params, online_params, 1.0 - momentum)
    for t, o in zip(target.buffers(), online.buffers(), strict=True):
        if t.is_floating_point():
            t.lerp_(o, 1.0 - momentum)
        else:
            t.copy_(o)


class MomentumSSLModule(SSLModule):
    """An :class:`SSLModule` with momentum copies of some of its online modules.

    A subclass builds its online modules, then ``self.target = momentum_copy(...)`` of them,
    and says in :meth:`momentum_pairs` which target follows which online module. This class
    updates the targets after each optimiser step (``on_train_batch_end``), with the momentum
    of ``trainer.global_step`` over the run's total optimiser steps. Targets are submodules,
    so checkpoints hold them; they are not in :meth:`head_modules`, so no optimiser touches
    them; exports take ``self.backbone``, the online network.

    Args:
        momentum: :class:`MomentumSchedule` arguments (``base``, ``final``, ``schedule``).
        **kwargs: See :class:`SSLModule`.
    """

    def __init__(self, momentum: Mapping[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.momentum_schedule = MomentumSchedule(**dict(momentum))
        self._updated_at_step: int | None = None
        self._total_steps: int | None = None

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """``(online, target)`` pairs of the same structure."""
        raise NotImplementedError

    def init_backbone(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        super().init_backbone(state, source)
        for online, target in self.momentum_pairs():  # targets start as copies of the online
            target.load_state_dict(online.state_dict())

    def configure_model(self) -> None:
        super().configure_model()
        if self.channels_last:
            for _, target in self.momentum_pairs():
                target.to(memory_format=torch.channels_last)

    @property
    def total_steps(self) -> int:
        """Optimiser steps of the whole run (the lr schedule's count when the data knows it)."""
        if self._total_steps is None:
            trainer = self.trainer
            datamodule = getattr(trainer, "datamodule", None)
            if hasattr(datamodule, "schedule") and hasattr(datamodule, "num_train_samples"):
                world = max(1, trainer.world_size)
                accumulate = max(1, int(trainer.accumulate_grad_batches))
                steps = datamodule.schedule.optimizer_steps(
                    datamodule.num_train_samples, world, accumulate
                )
                self._total_steps = max(1, int(sum(steps)))
            else:
                self._total_steps = max(1, int(trainer.estimated_stepping_batches))
        return self._total_steps

    @property
    def current_momentum(self) -> float:
        """Momentum of the update after the optimiser step just taken."""
        return self.momentum_schedule(self.trainer.global_step - 1, self.total_steps)

    def on_train_start(self) -> None:
        super().on_train_start()
        # After a checkpoint restore: the schedule continues from the restored global_step.
        self._updated_at_step = self.trainer.global_step
        self._total_steps = None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = self.trainer.global_step
        if step == self._updated_at_step:  # accumulating, or a skipped batch: no step taken
            return
        self._updated_at_step = step
        momentum = self.current_momentum
        for online, target in self.momentum_pairs():
            ema_update_(target, online, momentum)
        self.log("train/momentum", momentum, on_step=False, on_epoch=True, reduce_fx="max")
