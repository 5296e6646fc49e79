"""Homoscedastic-uncertainty loss weighting: a learned log-variance per task [0].

References:
    - [0] Kendall et al., Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
      Geometry and Semantics, CVPR 2018, https://arxiv.org/abs/1705.07115
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ssl_mt.losses.weighting.base import LossWeighting


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
