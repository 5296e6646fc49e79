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

One strategy a module: :mod:`~ssl_mt.losses.weighting.base` (:class:`LossWeighting`),
:mod:`~ssl_mt.losses.weighting.fixed`, :mod:`~ssl_mt.losses.weighting.uncertainty` [0],
:mod:`~ssl_mt.losses.weighting.dwa` [1] and :mod:`~ssl_mt.losses.weighting.famo` [2]; this
module holds the registry :data:`WEIGHTINGS` and :func:`build_weighting`.

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
from collections.abc import Mapping, Sequence

from ssl_mt.losses.weighting.base import LossWeighting
from ssl_mt.losses.weighting.dwa import DynamicWeightAverage
from ssl_mt.losses.weighting.famo import FAMO
from ssl_mt.losses.weighting.fixed import FixedWeighting
from ssl_mt.losses.weighting.uncertainty import UncertaintyWeighting

__all__ = [
    "FAMO",
    "WEIGHTINGS",
    "DynamicWeightAverage",
    "FixedWeighting",
    "LossWeighting",
    "UncertaintyWeighting",
    "build_weighting",
]

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
