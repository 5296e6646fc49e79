"""Catching a NaN or Inf loss at the step it happens.

``policy=raise`` stops the run with the step, the task and the last good checkpoint (which
is left untouched: no checkpoint is written after the bad step). ``policy=skip`` drops the
batch (a zero gradient, no optimiser step: :mod:`ssl_mt.models.skipping`) and counts it.
Under DDP the ranks agree at every step (the per-rank flags are summed over the ranks), so
under ``raise`` all of them stop at the same step with the same message, and under ``skip``
all of them skip the same batch. Either way the check reads one boolean per step from the
device; ``check_every_n_steps > 1`` (raise only) avoids the
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


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_flags(losses: Mapping[str, Tensor]) -> Tensor:
    """This rank's slot of the cross-rank fault vector: ``(world,)`` float, zero but for
    this rank's entry, which is 0 when every loss is finite, else 1 + the index of the first
    non-finite one.

    Summed over the ranks (one ``all_reduce``, or a few more floats in one the step makes
    anyway: :func:`ssl_mt.losses.global_mean.global_task_losses`), every rank learns which
    ranks saw a non-finite loss, and in which task.
    """
    finite = torch.stack([torch.isfinite(v.detach()).all() for v in losses.values()])
    flag = torch.where(finite.all(), 0, torch.argmin(finite.to(torch.uint8)) + 1)
    world, rank = (dist.get_world_size(), dist.get_rank()) if _distributed() else (1, 0)
    slots = torch.zeros(world, device=finite.device)
    slots[rank] = flag.to(slots.dtype)
    return slots


class NonFiniteGuard(nn.Module):
    """Watches the per-task losses of every training step.

    Under DDP the ranks decide together, at the same step: the per-rank flags are summed over
    the ranks every step (see :func:`rank_flags`), so under ``raise`` every rank stops with
    the same message (step, task, the ranks that saw it) and none is left waiting in a
    collective for the process-group timeout; under ``skip`` every rank skips the batch.

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
        self._first_flags: Tensor | None = None  # the summed flags of the first bad step
        self._names: list[str] = []

    def should_skip(
        self, losses: Mapping[str, Tensor], step: int, flags: Tensor | None = None
    ) -> bool:
        """Records the step's losses; True when the batch must be skipped (``skip`` policy).

        Args:
            losses: The step's losses.
            step: The global step.
            flags: The :func:`rank_flags` of every rank, already summed over the ranks (the
                caller folded them into a reduction it makes anyway). None: the guard
                computes them and, under DDP, makes the ``all_reduce`` itself. Either way
                every rank makes the same collectives every step.

        Raises:
            NonFiniteLossError: under ``raise``, at the first check after a bad step, on
                every rank alike.
        """
        if not self._names:
            self._names = list(losses)
        if flags is None:
            flags = rank_flags(losses)
            if _distributed():
                dist.all_reduce(flags, op=dist.ReduceOp.SUM)
        seen = flags > 0
        bad = seen.any()
        # Reduced losses (the same on every rank) can be non-finite with finite parts.
        finite = torch.stack([torch.isfinite(v.detach()).all() for v in losses.values()])
        bad = bad | ~finite.all()
        rank = torch.argmax(seen.to(torch.uint8))  # the first rank that saw it
        task = torch.where(seen.any(), flags[rank].long() - 1, torch.argmin(finite.to(torch.uint8)))
        record = bad & (self.first_bad_step < 0)
        self.first_bad_step.copy_(
            torch.where(record, torch.tensor(step, device=bad.device), self.first_bad_step)
        )
        self.first_bad_task.copy_(torch.where(record, task, self.first_bad_task))
        if self._first_flags is None or self._first_flags.shape != flags.shape:
            self._first_flags = torch.zeros_like(flags)
        self._first_flags = torch.where(record, flags, self._first_flags)
        if self.policy == "skip":
            if bool(bad):
                self.skipped += 1
                self.first_bad_step.fill_(-1)
                self._first_flags = None
                return True
            return False
        if (step + 1) % self.every == 0 and int(self.first_bad_step) >= 0:
            raise NonFiniteLossError(self.describe(losses))
        return False

    def describe(self, losses: Mapping[str, Tensor]) -> str:
        """The error message: the same on every rank under DDP (the losses' values, which
        differ between ranks, are named in one process only)."""
        step = int(self.first_bad_step)
        task = self._names[int(self.first_bad_task)] if self._names else "?"
        if _distributed():
            flags = self._first_flags
            ranks = [] if flags is None else torch.nonzero(flags > 0).flatten().tolist()
            if not ranks:
                where = " in the losses reduced over the ranks"
            else:
                where = f" on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
            return (
                f"non-finite loss at training step {step} in task {task!r}{where} (every rank "
                "stops at this step). No checkpoint was written after it."
            )
        values = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
        return (
            f"non-finite loss at training step {step} in task {task!r} (losses now: {values}). "
            "No checkpoint was written after it."
        )


def last_good_checkpoint(run_dir: str | Path) -> str:
    path = Path(run_dir) / "checkpoints" / "last.ckpt"
    return str(path) if path.is_file() else "none yet (the run had not finished an epoch)"


def guard_step(module: Any, losses: Mapping[str, Tensor], flags: Tensor | None = None) -> bool:
    """Runs ``module.nonfinite`` on a training step; True when the batch is to be skipped.

    ``flags``: the :func:`rank_flags` summed over the ranks by the caller (see
    :meth:`NonFiniteGuard.should_skip`).

    The error raised under ``policy=raise`` names the last good checkpoint of the run.
    """
    try:
        skip = module.nonfinite.should_skip(losses, module.global_step, flags=flags)
    except NonFiniteLossError as error:
        where = last_good_checkpoint(module.trainer.default_root_dir)
        raise NonFiniteLossError(
            f"{error} Last good checkpoint: {where}. Lower optim.base_lr, check the data "
            "(python -m ssl_mt.data check ROOT) or set nonfinite.policy=skip."
        ) from None
    if skip:
        module.log("train/nonfinite_skipped", module.nonfinite.skipped.float(), reduce_fx="max")
    return skip
