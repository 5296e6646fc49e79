"""Skipping a training step without letting DDP ranks fall out of step.

Returning ``None`` from ``training_step`` skips a batch in one process, but under DDP
Lightning refuses it (``RuntimeError``: "Skipping the training_step by returning None in
distributed training is not supported") and, before it did, ranks hung in the next gradient
all-reduce. A skipped step here instead returns :func:`zero_loss`, a loss of exactly 0
attached to every trainable parameter, so backward runs on every rank and DDP's all-reduce
(of zeros) completes; :func:`optimizer_step_unless_skipped` then leaves the optimiser step
out. The decision to skip must be the same on every rank (the callers reduce it first).

Under gradient accumulation a skipped micro-batch contributes nothing and the step of its
window is left out (the other micro-batches' gradients are cleared with the next window).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

SKIP_ATTRIBUTE = "_skip_optimizer_step"


def zero_loss(module: nn.Module) -> Tensor:
    """0, in the graph of every trainable parameter (each gets an exact zero gradient)."""
    terms = [p.sum() * 0.0 for p in module.parameters() if p.requires_grad]
    if not terms:
        return torch.zeros((), requires_grad=True)
    return torch.stack(terms).sum()


def skip_step(module: nn.Module) -> Tensor:
    """Marks the optimiser step of the current window as skipped; returns :func:`zero_loss`."""
    setattr(module, SKIP_ATTRIBUTE, True)
    return zero_loss(module)


def optimizer_step_unless_skipped(
    module: nn.Module, optimizer: Any, closure: Callable[[], Any] | None
) -> None:
    """``LightningModule.optimizer_step`` that leaves out a step marked by :func:`skip_step`.

    The closure (training step + backward, with DDP's all-reduce) runs first, as the
    precision plugins run it; the optimiser then steps with its result, or not at all.
    """
    result = closure() if closure is not None else None
    skipped = bool(getattr(module, SKIP_ATTRIBUTE, False))
    setattr(module, SKIP_ATTRIBUTE, False)
    if skipped:
        return
    optimizer.step(closure=lambda: result)
