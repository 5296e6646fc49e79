"""Dynamic Weight Average: task weights from the ratio of the last two epoch losses [1].

References:
    - [1] Liu et al., End-to-End Multi-Task Learning with Attention, CVPR 2019,
      https://arxiv.org/abs/1803.10704
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ssl_mt.losses.weighting.base import LossWeighting, check_positive, check_task_values


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
        self.temperature = check_positive("temperature", temperature)
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
        values = check_task_values("epoch_losses", self.task_names, epoch_losses, float("nan"))
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
