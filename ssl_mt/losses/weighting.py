"""Multi-task loss weighting: how per-task losses are combined into the loss that is optimised.

Every strategy is an :class:`torch.nn.Module` with the same interface, so the multi-task
LightningModule can swap them from the config (``build_weighting(name, ...)``):

* ``forward(losses, present)`` takes one scalar loss per task and a 0-dim bool tensor per task
  that says whether the batch holds at least one label of that task. It returns the total loss
  to backpropagate and the effective weight of each task (detached, for logging). It never
  synchronises host and device: no ``.item()``, no Python branching on tensor values, no
  boolean-mask indexing; presence is applied with :func:`torch.where`.
* ``epoch_end(epoch_losses)`` receives each task's mean training loss over the epoch (used by
  Dynamic Weight Average; a no-op elsewhere).

All state that changes during training lives in registered buffers or parameters of fixed size,
so it is saved in and restored from Lightning checkpoints exactly.

``base_weights`` (``TaskSpec.loss_weight``) are the weights of ``fixed``; the adaptive strategies
multiply their own weight by the base weight, so the default of 1.0 leaves them as published.

References:
    - [0] Kendall et al., Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
      Geometry and Semantics, CVPR 2018, https://arxiv.org/abs/1705.07115
    - [1] Liu et al., End-to-End Multi-Task Learning with Attention, CVPR 2019,
      https://arxiv.org/abs/1803.10704
    - [2] Liu et al., FAMO: Fast Adaptive Multitask Optimization, NeurIPS 2023,
      https://arxiv.org/abs/2306.03792
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "FAMO",
    "WEIGHTINGS",
    "DynamicWeightAverage",
    "FixedWeighting",
    "LossWeighting",
    "UncertaintyWeighting",
    "build_weighting",
]


def _check_positive(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value}.")
    return value


def _check_task_values(
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
        weights = _check_task_values("base_weights", names, base_weights, 1.0)
        for name, w in zip(names, weights, strict=True):
            _check_positive(f"base_weights[{name!r}]", w)
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


class FixedWeighting(LossWeighting):
    """Static weighted sum: ``total = sum_i w_i * L_i`` over the tasks present in the batch.

    Args:
        task_names: Names of the tasks.
        base_weights: Weight ``w_i`` per task (default 1.0).
    """

    def _combine(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        weights = self.base_weights.to(losses.dtype)
        return self._masked_sum(weights * losses, present), weights


class UncertaintyWeighting(LossWeighting):
    """Homoscedastic-uncertainty weighting [0].

    Each task has a learnable log-variance ``s_i = log(sigma_i^2)`` (the ``log_vars``
    parameter) and the total loss is::

        total = sum_i present_i * (exp(-s_i) * w_i * L_i + s_i)

    This is the common form of the paper's objective: for regression the paper has
    ``1 / (2 sigma^2) * L + log(sigma)`` and for classification ``1 / sigma^2 * L + log(sigma)``;
    with ``s = log(sigma^2)`` and the 1/2 factors dropped both become ``exp(-s) * L + s``
    (twice the regression objective, same minimiser ``s_i = log(L_i)``). A noisy task thus learns
    a large ``s_i`` and gets a small weight; the ``+ s_i`` term stops all weights from collapsing
    to zero. Absent tasks contribute nothing, so the regulariser does not push their ``s_i`` down
    on batches without their labels. The effective weight is ``w_i * exp(-s_i)``.

    ``log_vars`` is an :class:`~torch.nn.Parameter` trained by the main optimizer; exclude it
    from weight decay (decay pulls every ``s_i`` towards 0, i.e. towards equal weights).

    Args:
        task_names: Names of the tasks.
        base_weights: Static multiplier ``w_i`` of each task loss (default 1.0).
        init_log_var: Initial value of every ``s_i`` (0.0: weight 1).

    Raises:
        ValueError: If ``init_log_var`` is not finite.
    """

    def __init__(
        self,
        task_names: Sequence[str],
        base_weights: Mapping[str, float] | None = None,
        init_log_var: float = 0.0,
    ) -> None:
        super().__init__(task_names, base_weights)
        if not math.isfinite(float(init_log_var)):
            raise ValueError(f"init_log_var must be finite, got {init_log_var}.")
        self.log_vars = nn.Parameter(torch.full((self.num_tasks,), float(init_log_var)))

    def _combine(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        log_vars = self.log_vars.to(losses.dtype)
        weights = self.base_weights.to(losses.dtype) * torch.exp(-log_vars)
        return self._masked_sum(weights * losses + log_vars, present), weights


class DynamicWeightAverage(LossWeighting):
    """Dynamic Weight Average (DWA) [1].

    The weight of task ``i`` in epoch ``t`` follows the relative descent rate of its loss::

        r_i = L_i(t-1) / L_i(t-2)
        lambda_i(t) = K * exp(r_i / T) / sum_j exp(r_j / T)

    with ``L_i`` the epoch-mean training losses given to :meth:`epoch_end`, ``K`` the number of
    tasks (so the weights sum to ``K``) and ``T`` the temperature (larger: softer). The weights
    are 1 in the first two epochs. A task whose loss decreases slowly gets the larger weight. A
    task with no usable loss in either of the last two epochs (left out, non-finite, or a zero
    denominator) gets the neutral ratio ``r_i = 1``. The total loss is
    ``sum_i present_i * w_i * lambda_i * L_i``.

    Buffers: the last two epoch losses (``(2, K)``, NaN where unknown), the number of epochs seen
    (capped at 2) and the current ``lambda``.

    Args:
        task_names: Names of the tasks.
        base_weights: Static multiplier ``w_i`` of each task loss (default 1.0).
        temperature: Softmax temperature ``T`` (2.0 in the paper).

    Raises:
        ValueError: If ``temperature`` is not positive and finite.
    """

    def __init__(
        self,
        task_names: Sequence[str],
        base_weights: Mapping[str, float] | None = None,
        temperature: float = 2.0,
    ) -> None:
        super().__init__(task_names, base_weights)
        self.temperature = _check_positive("temperature", temperature)
        n = self.num_tasks
        self.register_buffer("epoch_losses", torch.full((2, n), float("nan")))
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("lambdas", torch.ones(n))

    def epoch_end(self, epoch_losses: Mapping[str, float | Tensor]) -> None:
        """Record the epoch's mean losses and compute the weights of the next epoch.

        Args:
            epoch_losses: Mean training loss per task over the epoch; tasks without labels in
                the epoch may be left out.

        Raises:
            ValueError: If ``epoch_losses`` names an unknown task.
        """
        values = _check_task_values("epoch_losses", self.task_names, epoch_losses, float("nan"))
        current = torch.tensor(values, dtype=self.epoch_losses.dtype).to(self.epoch_losses.device)
        current = torch.where(torch.isfinite(current), current, torch.full_like(current, math.nan))
        # Row 0: epoch t-2, row 1: epoch t-1 (after this call: the epoch that just ended).
        self.epoch_losses[0].copy_(self.epoch_losses[1])
        self.epoch_losses[1].copy_(current)
        self.epochs_seen.copy_(torch.clamp(self.epochs_seen + 1, max=2))
        older, newer = self.epoch_losses[0], self.epoch_losses[1]
        usable = torch.isfinite(older) & torch.isfinite(newer) & (older > 0) & (newer >= 0)
        ratio = torch.where(usable, newer / torch.where(usable, older, 1.0), 1.0)
        lambdas = self.num_tasks * torch.softmax(ratio / self.temperature, dim=0)
        self.lambdas.copy_(torch.where(self.epochs_seen >= 2, lambdas, 1.0))

    def _combine(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        weights = (self.base_weights * self.lambdas).to(losses.dtype)
        return self._masked_sum(weights * losses, present), weights


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
        self.lr = _check_positive("lr", lr)
        self.weight_decay = float(weight_decay)
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"weight_decay must be finite and >= 0, got {weight_decay}.")
        self.eps = _check_positive("eps", eps)
        self.adam_eps = _check_positive("adam_eps", adam_eps)
        betas = tuple(float(b) for b in betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}.")
        self.betas: tuple[float, float] = (betas[0], betas[1])
        bounds = _check_task_values("min_losses", self.task_names, min_losses, 0.0)
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


WEIGHTINGS: dict[str, type[LossWeighting]] = {
    "fixed": FixedWeighting,
    "uncertainty": UncertaintyWeighting,
    "dwa": DynamicWeightAverage,
    "famo": FAMO,
}


def build_weighting(
    name: str,
    task_names: Sequence[str],
    base_weights: Mapping[str, float] | None = None,
    **kwargs: object,
) -> LossWeighting:
    """Build a weighting strategy by its registry name.

    Args:
        name: One of the keys of :data:`WEIGHTINGS` (case-insensitive).
        task_names: Names of the tasks.
        base_weights: Static weight per task (default 1.0).
        **kwargs: Strategy options (e.g. ``temperature`` for ``dwa``, ``lr`` for ``famo``).

    Returns:
        The strategy module.

    Raises:
        ValueError: If ``name`` is unknown or an option is not accepted by the strategy.
    """
    key = str(name).strip().lower()
    if key not in WEIGHTINGS:
        raise ValueError(f"Unknown loss weighting {name!r}; valid names are {sorted(WEIGHTINGS)}.")
    cls = WEIGHTINGS[key]
    accepted = [
        p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "task_names")
    ]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"Loss weighting {key!r} does not accept option(s) {unknown}; "
            f"its options are {[p for p in accepted if p != 'base_weights']}."
        )
    return cls(task_names, base_weights, **kwargs)
