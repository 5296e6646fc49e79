"""DINO's self-distillation loss: cross-entropy from a centred, sharpened teacher.

- [0] DINO, 2021, https://arxiv.org/abs/2104.14294 (Algorithm 1, Sec. 3.1)

The teacher sees the global views only; the student sees every view. For every pair of a
teacher view and a DIFFERENT student view, ``H(P_t, P_s) = −Σ P_t log P_s`` with
``P_t = softmax((t − c) / τ_t)`` and ``P_s = softmax(s / τ_s)``; the loss is the mean over
those pairs. Centring (``c``, an EMA of the teacher's batch mean, averaged over every rank)
keeps one dimension from dominating; sharpening (a low ``τ_t``) keeps the output from
becoming uniform. Together they prevent collapse without negatives.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_mt.losses.precision import autocast_off


def dino_cross_entropy(
    student: Sequence[Tensor],
    teacher: Sequence[Tensor],
    center: Tensor,
    student_temperature: float,
    teacher_temperature: float,
) -> Tensor:
    """Mean cross-entropy over (teacher view i, student view v) pairs with v ≠ i.

    Args:
        student: One (B, K) output per view, global views first (same order as ``teacher``).
        teacher: One (B, K) output per global view (no gradient).
        center: (1, K) or (K,) teacher centre.
        student_temperature: τ_s (DINO: 0.1).
        teacher_temperature: τ_t (DINO: 0.04–0.07).

    Computed in float32, also under autocast.
    """
    with autocast_off(student[0]):
        log_ps = [F.log_softmax(s.float() / student_temperature, dim=-1) for s in student]
        terms = []
        for i, t in enumerate(teacher):
            pt = F.softmax((t.detach().float() - center.float()) / teacher_temperature, dim=-1)
            for v, log_p in enumerate(log_ps):
                if v != i:
                    terms.append(-(pt * log_p).sum(dim=-1).mean())
        if not terms:
            raise ValueError("DINO needs at least two views (no pair of different views)")
        return torch.stack(terms).mean()


class DINOLoss(nn.Module):
    """:func:`dino_cross_entropy` plus the centre, a buffer (saved in checkpoints).

    Args:
        out_dim: K, the head's output size.
        student_temperature: τ_s (> 0).
        center_momentum: EMA momentum of the centre, in [0, 1) (DINO: 0.9).
    """

    def __init__(
        self, out_dim: int, student_temperature: float = 0.1, center_momentum: float = 0.9
    ) -> None:
        super().__init__()
        if student_temperature <= 0:
            raise ValueError(f"method.student_temperature must be > 0, got {student_temperature}")
        if not 0.0 <= center_momentum < 1.0:
            raise ValueError(f"method.center_momentum must be in [0, 1), got {center_momentum}")
        self.student_temperature = student_temperature
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(
        self, student: Sequence[Tensor], teacher: Sequence[Tensor], teacher_temperature: float
    ) -> Tensor:
        """The loss, then the centre update with this batch's teacher outputs."""
        loss = dino_cross_entropy(
            student, teacher, self.center, self.student_temperature, teacher_temperature
        )
        self.update_center(torch.cat(list(teacher)))
        return loss

    @torch.no_grad()
    def update_center(self, teacher: Tensor) -> None:
        """``c ← m · c + (1 − m) · mean of the teacher outputs of every rank``.

        Every rank calls it every step it runs the method (a step skipped for bad samples is
        skipped by all ranks before the forward). A non-finite batch mean (a step the
        non-finite guard will skip) leaves the centre as it was, on every rank alike: the
        reduced statistics are the same everywhere.
        """
        # Sum and count in one tensor: one all_reduce per step.
        count = torch.full((1,), float(teacher.shape[0]), device=teacher.device)
        stats = torch.cat([teacher.float().sum(dim=0), count])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        batch_center = (stats[:-1] / stats[-1]).unsqueeze(0)
        updated = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        # torch.where, not a Python branch: no host-device synchronisation.
        self.center.copy_(torch.where(torch.isfinite(batch_center).all(), updated, self.center))
