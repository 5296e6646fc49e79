"""FAMO: task weights that balance the rates at which the task losses improve [2].

References:
    - [2] Liu et al., FAMO: Fast Adaptive Multitask Optimization, NeurIPS 2023,
      https://arxiv.org/abs/2306.03792
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ssl_mt.losses.weighting.base import LossWeighting, check_positive, check_task_values


class FAMO(LossWeighting):
    """Fast Adaptive Multitask Optimization (FAMO) [2].

    FAMO balances the rate at which the task losses improve, at O(1) cost per step (no per-task
    gradients). It keeps task logits ``xi`` (a buffer) with ``z = softmax(xi)`` and optimises::

        total = c * sum_i z_i * log(L_i - b_i + eps),   c = (sum_i z_i / (L_i - b_i + eps))^-1

    where ``b_i`` is a lower bound of the loss (``min_losses``, default 0) and ``c`` is detached.
    The gradient of ``total`` with respect to ``L_i`` is ``c * z_i / (L_i - b_i + eps)`` (the
    reported effective weight; over the present tasks they sum to 1 with unit base weights), so
    every step decreases all log-losses at a rate set by ``z``. ``L_i - b_i`` is clamped at 0, so
    a zero loss gives ``log(eps)``: finite.

    After a step, the paper updates ``xi`` from the log-loss improvement
    ``delta_i = log(L_i(t) - b_i + eps) - log(L_i(t+1) - b_i + eps)`` with an Adam step (lr
    ``beta``, weight decay ``gamma``) along ``J_softmax(xi)^T delta``; this lowers the logits of
    tasks that improved fast and so raises the weight of slowly improving tasks. The paper
    re-evaluates ``L(t+1)`` on the same batch; here the (detached) losses of the next call of
    :meth:`forward` stand in for it, a zero-cost approximation. Each training-mode forward first
    updates ``xi`` from (previous losses, current losses) and then computes the loss with the
    updated ``z``. Forwards in eval mode (validation) change no state.

    Deviations needed for partially labeled batches and DDP:

    * A task that is absent from the current or the previous batch (or has a non-finite loss)
      neither moves nor influences the logits: the softmax Jacobian is taken over the valid
      tasks only, and the Adam moments, step count (kept per task) and weight decay are applied
      to the valid entries only. With every task present this is exactly the paper's update.
    * Absent tasks contribute zero to ``total`` and are left out of ``c``.
    * Under DDP the losses given are already the global ones (the value of each task loss is
      its mean over the labeled samples of the global batch, the same on every rank;
      :mod:`ssl_mt.losses.global_mean`), and so are the presence flags. Every rank therefore
      computes the same ``c`` and the same logit update without a collective of its own, and
      the gradient of ``total`` is that of one process on the concatenated batch.

    ``total`` is a sum of log-losses (it can be negative); log the task losses to follow
    training. ``base_weights`` multiply the effective weights; they do not enter the logit update.

    Args:
        task_names: Names of the tasks.
        base_weights: Static multiplier of each task's effective weight (default 1.0).
        lr: Step size ``beta`` of the logit update (0.025 in the paper).
        weight_decay: Weight decay ``gamma`` of the logit update (0.001 in the paper).
        eps: ``eps`` added inside the logarithm.
        min_losses: Lower bound ``b_i`` per task (default 0.0).
        betas: Adam moment coefficients of the logit update.
        adam_eps: Adam denominator epsilon of the logit update.

    Raises:
        ValueError: If a hyper-parameter is out of range or ``min_losses`` names an unknown task
            or holds a non-finite value.
    """

    def __init__(
        self,
        task_names: Sequence[str],
        base_weights: Mapping[str, float] | None = None,
        lr: float = 0.025,
        weight_decay: float = 0.001,
        eps: float = 1e-8,
        min_losses: Mapping[str, float] | None = None,
        betas: Sequence[float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
    ) -> None:
        super().__init__(task_names, base_weights)
        self.lr = check_positive("lr", lr)
        self.weight_decay = float(weight_decay)
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"weight_decay must be finite and >= 0, got {weight_decay}.")
        self.eps = check_positive("eps", eps)
        self.adam_eps = check_positive("adam_eps", adam_eps)
        betas = tuple(float(b) for b in betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}.")
        self.betas: tuple[float, float] = (betas[0], betas[1])
        bounds = check_task_values("min_losses", self.task_names, min_losses, 0.0)
        if not all(math.isfinite(b) for b in bounds):
            raise ValueError(f"min_losses must be finite, got {bounds}.")
        n = self.num_tasks
        self.register_buffer(
            "min_losses", torch.tensor(bounds, dtype=torch.float32), persistent=False
        )
        self.register_buffer("logits", torch.zeros(n))
        self.register_buffer("exp_avg", torch.zeros(n))
        self.register_buffer("exp_avg_sq", torch.zeros(n))
        self.register_buffer("steps", torch.zeros(n, dtype=torch.long))
        self.register_buffer("prev_losses", torch.zeros(n))
        self.register_buffer("prev_present", torch.zeros(n, dtype=torch.bool))

    def probabilities(self) -> Tensor:
        """Current task probabilities ``z = softmax(xi)`` (detached)."""
        return torch.softmax(self.logits, dim=0).detach()

    def _shifted(self, losses: Tensor) -> Tensor:
        """``max(L - b, 0) + eps``: its logarithm is finite for any finite loss, zero included."""
        return torch.clamp(losses - self.min_losses.to(losses.dtype), min=0.0) + self.eps

    @torch.no_grad()
    def _update_logits(self, losses: Tensor, present: Tensor) -> None:
        """One Adam step of the logits from the previous and the current detached losses."""
        losses = losses.detach().to(self.prev_losses.dtype)
        present = present & torch.isfinite(losses)
        losses = torch.where(present, losses, torch.zeros_like(losses))
        valid = present & self.prev_present
        delta = torch.log(self._shifted(self.prev_losses)) - torch.log(self._shifted(losses))
        delta = torch.where(valid, delta, torch.zeros_like(delta))
        # Gradient of <delta, softmax(xi)> w.r.t. xi, the softmax restricted to the valid tasks.
        shifted = torch.where(valid, self.logits, torch.full_like(self.logits, -math.inf))
        exps = torch.where(valid, torch.exp(shifted - shifted.max().clamp(min=-1e30)), 0.0)
        z = exps / exps.sum().clamp(min=1e-30)
        grad = z * (delta - (z * delta).sum()) + self.weight_decay * self.logits
        # Adam (L2 weight decay, as torch.optim.Adam), applied to the valid entries only.
        beta1, beta2 = self.betas
        steps = self.steps + valid.long()
        exp_avg = torch.where(valid, beta1 * self.exp_avg + (1 - beta1) * grad, self.exp_avg)
        exp_avg_sq = torch.where(
            valid, beta2 * self.exp_avg_sq + (1 - beta2) * grad * grad, self.exp_avg_sq
        )
        t = steps.clamp(min=1).to(self.logits.dtype)
        bias1 = 1 - beta1**t
        bias2 = 1 - beta2**t
        denom = exp_avg_sq.sqrt() / bias2.sqrt() + self.adam_eps
        logits = self.logits - self.lr * exp_avg / (bias1 * denom)
        self.logits.copy_(torch.where(valid, logits, self.logits))
        self.exp_avg.copy_(exp_avg)
        self.exp_avg_sq.copy_(exp_avg_sq)
        self.steps.copy_(steps)
        self.prev_losses.copy_(losses)
        self.prev_present.copy_(present)

    def _combine(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        if self.training:
            self._update_logits(losses, present)
        shifted = self._shifted(losses)
        z = torch.softmax(self.logits, dim=0).to(losses.dtype)
        inv = torch.where(present, z / shifted.detach(), torch.zeros_like(z))  # z_i / (L_i-b_i+eps)
        norm = inv.sum()
        c = torch.where(norm > 0, 1.0 / norm.clamp(min=torch.finfo(norm.dtype).tiny), 0.0)
        base = self.base_weights.to(losses.dtype)
        total = self._masked_sum(base * c * z * torch.log(shifted), present)
        return total, base * c * inv
