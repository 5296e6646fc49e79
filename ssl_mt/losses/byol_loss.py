"""Cosine regression losses of the non-contrastive methods: BYOL and SimSiam.

- [0] BYOL, 2020, https://arxiv.org/abs/2006.07733 (Eq. 2, normalised MSE = 2 − 2 cos)
- [1] SimSiam, 2021, https://arxiv.org/abs/2011.10566 (Eq. 1–2, negative cosine, stop-grad)

Both regress the online prediction ``p`` of one view onto the target projection ``z`` of
the other view, which carries no gradient (BYOL: an EMA network; SimSiam: the same network
behind a stop-gradient). They differ by an affine map: ``2 − 2 cos = 2 · (1 + D)``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def normalized_mse(p: Tensor, z: Tensor) -> Tensor:
    """Per-sample ``‖p/‖p‖ − z/‖z‖‖² = 2 − 2 cos(p, z)``, gradient to ``p`` only.

    Args:
        p: (B, D) online predictions.
        z: (B, D) targets (detached here).

    Returns:
        (B,) losses in [0, 4].
    """
    return 2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=-1)


def byol_loss(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
    """BYOL's symmetrised loss ``L + L̃``: ``p1`` predicts ``z2`` and ``p2`` predicts ``z1``.

    Args:
        p1, p2: (B, D) online predictions of views 1 and 2.
        z1, z2: (B, D) target projections of views 1 and 2.

    Returns:
        Scalar batch mean, in [0, 8].
    """
    return (normalized_mse(p1, z2) + normalized_mse(p2, z1)).mean()


def negative_cosine(p: Tensor, z: Tensor) -> Tensor:
    """SimSiam's ``D(p, z) = −cos(p, stopgrad(z))``, batch mean."""
    return -F.cosine_similarity(p.float(), z.detach().float(), dim=-1).mean()


def simsiam_loss(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
    """SimSiam's symmetrised loss ``D(p1, z2)/2 + D(p2, z1)/2``, in [−1, 1]."""
    return negative_cosine(p1, z2) / 2 + negative_cosine(p2, z1) / 2
