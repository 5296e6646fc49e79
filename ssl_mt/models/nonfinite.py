"""Catching a NaN or Inf loss at the step it happens.

``policy=raise`` stops the run with the step, the task and the last good checkpoint (which
is left untouched: no checkpoint is written after the bad step). ``policy=skip`` drops the
batch (a zero gradient, no optimiser step: :mod:`ssl_mt.models.skipping`) and counts it;
under DDP every rank skips the same batch. Either way the check reads one
boolean per step from the device; ``check_every_n_steps > 1`` (raise only) avoids the
per-step synchronisation and still names the first bad step, recorded on the device.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

POLICIES = ("raise", "skip")


class NonFiniteLossError(FloatingPointError):
    """A training loss became NaN or Inf."""


class NonFiniteGuard(nn.Module):
    """Watches the per-task losses of every training step.

    Args:
        policy: ``raise`` or ``skip``.
        check_every_n_steps: Read the device flags every N steps (``raise`` only).
    """

    def __init__(self, policy: str = "raise", check_every_n_steps: int = 1) -> None:
        super().__init__()
        if policy not in POLICIES:
            raise ValueError(f"nonfinite.policy must be one of {POLICIES}, got {policy!r}")
        if check_every_n_steps < 1:
            raise ValueError("nonfinite.check_every_n_steps must be >= 1")
        if policy == "skip" and check_every_n_steps != 1:
            raise ValueError(
                "nonfinite.policy=skip decides per batch: check_every_n_steps must be 1"
            )
        self.policy = policy
        self.every = check_every_n_steps
        self.register_buffer("skipped", torch.zeros((), dtype=torch.long))
        self.register_buffer("first_bad_step", torch.full((), -1, dtype=torch.long))
        self.register_buffer("first_bad_task", torch.full((), -1, dtype=torch.long))
        self._names: list[str] = []

    def should_skip(self, losses: Mapping[str, Tensor], step: int, synced: bool = False) -> bool:
        """Records the step's losses; True when the batch must be skipped (``skip`` policy).

        Args:
            losses: The step's losses.
            step: The global step.
            synced: The losses are already reduced over the ranks (the same on every rank),
                so every rank decides alike without a further collective.

        Raises:
            NonFiniteLossError: under ``raise``, at the first check after a bad step.
        """
        if not self._names:
            self._names = list(losses)
        finite = torch.stack([torch.isfinite(v.detach()).all() for v in losses.values()])
        bad = ~finite.all()
        if self.policy == "skip" and not synced and dist.is_available() and dist.is_initialized():
            # Every rank must skip the same batch, or DDP's gradient all-reduce hangs.
            flag = bad.to(torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bad = flag.bool()
        first = torch.argmin(finite.to(torch.uint8))
        record = bad & (self.first_bad_step < 0)
        self.first_bad_step.copy_(
            torch.where(record, torch.tensor(step, device=bad.device), self.first_bad_step)
        )
        self.first_bad_task.copy_(torch.where(record, first, self.first_bad_task))
        if self.policy == "skip":
            if bool(bad):
                self.skipped += 1
                self.first_bad_step.fill_(-1)
                return True
            return False
        if (step + 1) % self.every == 0 and int(self.first_bad_step) >= 0:
            raise NonFiniteLossError(self.describe(losses))
        return False

    def describe(self, losses: Mapping[str, Tensor]) -> str:
        step = int(self.first_bad_step)
        task = self._names[int(self.first_bad_task)] if self._names else "?"
        values = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
        return (
            f"non-finite loss at training step {step} in task {task!r} (losses now: {values}). "
            "No checkpoint was written after it."
        )


def last_good_checkpoint(run_dir: str | Path) -> str:
    path = Path(run_dir) / "checkpoints" / "last.ckpt"
    return str(path) if path.is_file() else "none yet (the run had not finished an epoch)"


def guard_step(module: Any, losses: Mapping[str, Tensor], synced: bool = False) -> bool:
    """Runs ``module.nonfinite`` on a training step; True when the batch is to be skipped.

    ``synced``: the losses are the same on every rank (see :meth:`NonFiniteGuard.should_skip`).

    The error raised under ``policy=raise`` names the last good checkpoint of the run.
    """
    try:
        skip = module.nonfinite.should_skip(losses, module.global_step, synced=synced)
    except NonFiniteLossError as error:
        where = last_good_checkpoint(module.trainer.default_root_dir)
        raise NonFiniteLossError(
            f"{error} Last good checkpoint: {where}. Lower optim.base_lr, check the data "
            "(python -m ssl_mt.data check ROOT) or set nonfinite.policy=skip."
        ) from None
    if skip:
        module.log("train/nonfinite_skipped", module.nonfinite.skipped.float(), reduce_fx="max")
    return skip
