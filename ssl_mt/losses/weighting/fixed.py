"""Fixed loss weighting: the static weighted sum of the task losses (the default)."""

from __future__ import annotations

from torch import Tensor

from ssl_mt.losses.weighting.base import LossWeighting


class FixedWeighting(LossWeighting):
    """Static weighted sum: ``total = sum_i w_i * L_i`` over the tasks present in the batch.

    Args:
        task_names: Names of the tasks.
        base_weights: Weight ``w_i`` per task (default 1.0).
    """

    def _combine(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        weights = self.base_weights.to(losses.dtype)
        return self._masked_sum(weights * losses, present), weights
