"""Per-task losses that average over the samples labeled for the task only.

Every loss is a mean of per-sample losses (``per_sample(logits, target) -> (N,)``), so a
batch's loss can be reduced exactly over DDP ranks and accumulated micro-batches: training
sums the labeled samples' losses and divides by the global labeled count
(:mod:`ssl_mt.losses.global_mean`); evaluation averages them over the labeled samples of
the whole split.

Dice is the per-sample soft Dice with additive smoothing 1 (``1 - (2Σpt + 1)/(Σp + Σt + 1)``
over each image's pixels), not a Dice over the batch's pixels: a batch-level Dice is a ratio
of sums that does not split into per-sample terms, so it would depend on how the global
batch is cut into ranks and micro-batches; per sample it does not. The smoothing keeps an
empty mask's loss defined (and pushes its prediction towards empty). The reported Dice
metric is a different quantity: the pixel-level F1 over every labeled pixel of the split.

``forward`` (a masked mean over one batch) is the single-process form: a batch without a
label for a task gives exactly 0.0 for that task (never NaN), still attached to the graph.
No boolean indexing, so no host-device synchronisation in the training step.
"""

from __future__ import annotations

import torch.nn.functional as F
from segmentation_models_pytorch.losses import SoftBCEWithLogitsLoss
from torch import Tensor, nn

from ssl_mt.tasks import TaskSpec


def masked_mean(per_sample: Tensor, present: Tensor) -> Tensor:
    """Mean of ``per_sample`` (N,) over the entries where ``present`` (N,) is True; 0 if none."""
    weights = present.to(per_sample.dtype)
    return (per_sample * weights).sum() / weights.sum().clamp(min=1.0)


def soft_dice_loss(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """Per-sample soft Dice loss of (N, 1, H, W) logits against {0, 1} masks: (N,).

    ``1 - (2·Σ p·t + smooth) / (Σ p + Σ t + smooth)`` over each sample's pixels. Per sample
    (not over the batch's pixels) so that a batch's loss is a mean over samples, which can be
    reduced exactly across ranks and micro-batches; ``smooth`` keeps an empty mask's loss
    defined, with a gradient that pushes the prediction towards empty.
    """
    probs = logits.float().sigmoid().flatten(1)
    target = target.float().flatten(1)
    intersection = (probs * target).sum(dim=1)
    cardinality = probs.sum(dim=1) + target.sum(dim=1)
    return 1.0 - (2.0 * intersection + smooth) / (cardinality + smooth)


class MaskedSegmentationLoss(nn.Module):
    """BCE + soft Dice per sample, averaged over the labeled samples of a batch.

    BCE is segmentation_models_pytorch's (mean over each sample's pixels); Dice is the
    per-sample soft Dice of :func:`soft_dice_loss`.

    Args:
        bce_weight: Weight of the BCE term.
        dice_weight: Weight of the Dice term.
        dice_smooth: Additive smoothing of the Dice ratio.
    """

    def __init__(
        self, bce_weight: float = 1.0, dice_weight: float = 1.0, dice_smooth: float = 1.0
    ) -> None:
        super().__init__()
        self.bce_weight = bce_weight
        self.dice_weight = dice_weight
        self.dice_smooth = dice_smooth
        self.bce = SoftBCEWithLogitsLoss(reduction="none", ignore_index=None)

    def per_sample(self, logits: Tensor, target: Tensor) -> Tensor:
        """The loss of every sample, labeled or not: (N,) from (N, 1, H, W) logits/masks."""
        logits = logits.float()
        loss = self.bce_weight * self.bce(logits, target.float()).flatten(1).mean(dim=1)
        if self.dice_weight:
            loss = loss + self.dice_weight * soft_dice_loss(logits, target, self.dice_smooth)
        return loss

    def forward(self, logits: Tensor, target: Tensor, present: Tensor) -> Tensor:
        """Mean loss over the samples where ``present`` (N,) is True; 0 if none."""
        return masked_mean(self.per_sample(logits, target), present)


class MaskedClassificationLoss(nn.Module):
    """Cross-entropy (optional label smoothing) over the labeled samples of a batch."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def per_sample(self, logits: Tensor, target: Tensor) -> Tensor:
        """The loss of every sample: (N,) from (N, C) logits and (N,) indices (-1 = unlabeled,
        whose entry is a placeholder to be masked out)."""
        return F.cross_entropy(
            logits.float(),
            target.clamp(min=0),
            reduction="none",
            label_smoothing=self.label_smoothing,
        )

    def forward(self, logits: Tensor, target: Tensor, present: Tensor) -> Tensor:
        """Mean loss over the samples where ``present`` (N,) is True; 0 if none."""
        return masked_mean(self.per_sample(logits, target), present)


def build_task_loss(task: TaskSpec) -> nn.Module:
    if task.is_segmentation:
        return MaskedSegmentationLoss()
    return MaskedClassificationLoss(task.label_smoothing)
