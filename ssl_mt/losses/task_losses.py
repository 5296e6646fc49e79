"""Per-task losses that average over the samples labeled for the task only.

A batch without a label for a task gives exactly 0.0 for that task (never NaN), still
attached to the graph so DDP sees a gradient for every parameter. No boolean indexing, so
no host-device synchronisation in the training step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss, SoftBCEWithLogitsLoss
from torch import Tensor, nn

from ssl_mt.tasks import TaskSpec

_IGNORE = -1


def masked_mean(per_sample: Tensor, present: Tensor) -> Tensor:
    """Mean of ``per_sample`` (N,) over the entries where ``present`` (N,) is True; 0 if none."""
    weights = present.to(per_sample.dtype)
    return (per_sample * weights).sum() / weights.sum().clamp(min=1.0)


class MaskedSegmentationLoss(nn.Module):
    """BCE + Dice (segmentation_models_pytorch losses) over the labeled samples of a batch.

    BCE is the mean over the pixels of each labeled sample, averaged over labeled samples.
    Dice is computed over all pixels of the labeled samples of the batch; unlabeled
    samples are excluded through Dice's ``ignore_index``.

    Args:
        bce_weight: Weight of the BCE term.
        dice_weight: Weight of the Dice term.
    """

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0) -> None:
        super().__init__()
        self.bce_weight = bce_weight
        self.dice_weight = dice_weight
        self.bce = SoftBCEWithLogitsLoss(reduction="none", ignore_index=None)
        self.dice = DiceLoss(mode="binary", from_logits=True, ignore_index=_IGNORE)

    def forward(self, logits: Tensor, target: Tensor, present: Tensor) -> Tensor:
        """Loss of (N, 1, H, W) logits against (N, 1, H, W) {0, 1} masks; present is (N,)."""
        logits = logits.float()
        bce = self.bce(logits, target).flatten(1).mean(dim=1)
        loss = self.bce_weight * masked_mean(bce, present)
        if self.dice_weight:
            dice_target = torch.where(present[:, None, None, None], target, _IGNORE)
            dice = self.dice(logits, dice_target)
            loss = loss + self.dice_weight * dice * present.any().to(dice.dtype)
        return loss


class MaskedClassificationLoss(nn.Module):
    """Cross-entropy (optional label smoothing) over the labeled samples of a batch."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: Tensor, target: Tensor, present: Tensor) -> Tensor:
        """Loss of (N, C) logits against (N,) class indices (-1 = unlabeled)."""
        per_sample = F.cross_entropy(
            logits.float(),
            target.clamp(min=0),
            reduction="none",
            label_smoothing=self.label_smoothing,
        )
        return masked_mean(per_sample, present)


def build_task_loss(task: TaskSpec) -> nn.Module:
    if task.is_segmentation:
        return MaskedSegmentationLoss()
    return MaskedClassificationLoss(task.label_smoothing)
