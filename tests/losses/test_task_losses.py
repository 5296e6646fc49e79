"""Masked task losses (``ssl_mt.losses.task_losses``) against values computed by hand.

The expected values use plain torch on the labeled subset of the batch only; the
unlabeled samples carry different (random) targets and logits, so a leak of any of them
into the loss changes the value.
"""

from __future__ import annotations

import pytest
import torch

from ssl_mt.losses.task_losses import (
    MaskedClassificationLoss,
    MaskedSegmentationLoss,
    build_task_loss,
    masked_mean,
)
from ssl_mt.tasks import TaskSpec

PRESENT = torch.tensor([True, False, True, False, True, True])


def _seg_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 1, 8, 8, generator=gen) * 2
    target = (torch.rand(6, 1, 8, 8, generator=gen) > 0.6).float()
    return logits, target


def _bce_by_hand(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over pixels per sample, then mean over samples."""
    p = torch.sigmoid(logits)
    per_pixel = -(target * torch.log(p) + (1 - target) * torch.log(1 - p))
    return per_pixel.flatten(1).mean(dim=1).mean()


def _dice_by_hand(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss of each given sample (smooth 1), averaged over the samples."""
    losses = []
    for lg, tg in zip(logits, target, strict=True):
        p = torch.sigmoid(lg)
        losses.append(1 - (2 * (p * tg).sum() + 1) / (p.sum() + tg.sum() + 1))
    return torch.stack(losses).mean()


def test_segmentation_loss_equals_bce_plus_dice_over_labeled_samples():
    logits, target = _seg_batch()
    lab_logits, lab_target = logits[PRESENT].double(), target[PRESENT].double()

    bce = _bce_by_hand(lab_logits, lab_target)
    dice = _dice_by_hand(lab_logits, lab_target)

    only_bce = MaskedSegmentationLoss(bce_weight=1.0, dice_weight=0.0)(logits, target, PRESENT)
    only_dice = MaskedSegmentationLoss(bce_weight=0.0, dice_weight=1.0)(logits, target, PRESENT)
    both = MaskedSegmentationLoss()(logits, target, PRESENT)

    torch.testing.assert_close(only_bce.double(), bce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(only_dice.double(), dice, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both.double(), bce + dice, rtol=1e-5, atol=1e-6)


def test_segmentation_loss_ignores_unlabeled_samples_entirely():
    logits, target = _seg_batch()
    loss = MaskedSegmentationLoss()(logits, target, PRESENT)
    # Change everything about the unlabeled samples: the loss must not move.
    logits2, target2 = logits.clone(), target.clone()
    logits2[~PRESENT] = torch.randn_like(logits2[~PRESENT]) * 5
    target2[~PRESENT] = 1.0 - target2[~PRESENT]
    torch.testing.assert_close(MaskedSegmentationLoss()(logits2, target2, PRESENT), loss)
    # And it differs from the loss over the whole batch (so the test above can fail).
    everything = MaskedSegmentationLoss()(logits, target, torch.ones(6, dtype=torch.bool))
    assert not torch.isclose(everything, loss)


def test_segmentation_loss_gradient_flows_only_to_labeled_samples():
    logits, target = _seg_batch()
    logits.requires_grad_(True)
    MaskedSegmentationLoss()(logits, target, PRESENT).backward()
    assert logits.grad is not None
    assert torch.all(logits.grad[~PRESENT] == 0)
    assert torch.all(logits.grad[PRESENT].abs().flatten(1).sum(1) > 0)


@pytest.mark.parametrize(
    "loss_fn, logits, target",
    [
        (MaskedSegmentationLoss(), torch.randn(4, 1, 8, 8), torch.ones(4, 1, 8, 8)),
        (MaskedClassificationLoss(), torch.randn(4, 3), torch.full((4,), -1)),
        (MaskedClassificationLoss(0.1), torch.randn(4, 3), torch.full((4,), -1)),
    ],
    ids=["segmentation", "classification", "classification-smoothing"],
)
def test_no_labeled_sample_gives_exactly_zero_and_a_zero_gradient(loss_fn, logits, target):
    logits = logits.clone().requires_grad_(True)
    present = torch.zeros(4, dtype=torch.bool)
    loss = loss_fn(logits, target, present)
    assert loss.dim() == 0
    assert not torch.isnan(loss)
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None, "the loss must stay attached to the graph"
    assert torch.isfinite(logits.grad).all()
    assert torch.all(logits.grad == 0)


def _ce_by_hand(logits: torch.Tensor, target: torch.Tensor, smoothing: float) -> torch.Tensor:
    log_p = torch.log_softmax(logits.double(), dim=1)
    nll = -log_p.gather(1, target[:, None]).squeeze(1)
    uniform = -log_p.mean(dim=1)
    return ((1 - smoothing) * nll + smoothing * uniform).mean()


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_classification_loss_is_cross_entropy_over_labeled_samples(smoothing: float):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 4, generator=gen) * 3
    target = torch.tensor([2, -1, 0, -1, 3, 1])
    present = target >= 0
    expected = _ce_by_hand(logits[present], target[present], smoothing)
    loss = MaskedClassificationLoss(smoothing)(logits, target, present)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    # The unlabeled rows do not count: changing their logits changes nothing.
    logits2 = logits.clone()
    logits2[~present] = torch.randn(2, 4) * 10
    torch.testing.assert_close(MaskedClassificationLoss(smoothing)(logits2, target, present), loss)


def test_label_smoothing_changes_the_loss_and_comes_from_the_task():
    logits = torch.tensor([[4.0, 0.0, -2.0], [0.5, 2.5, 0.0]])
    target, present = torch.tensor([0, 1]), torch.tensor([True, True])
    plain = build_task_loss(TaskSpec("blur", "classification", "blur", ("a", "b", "c")))
    smooth = build_task_loss(
        TaskSpec("blur", "classification", "blur", ("a", "b", "c"), label_smoothing=0.3)
    )
    assert isinstance(smooth, MaskedClassificationLoss)
    torch.testing.assert_close(
        smooth(logits, target, present).double(), _ce_by_hand(logits, target, 0.3)
    )
    assert smooth(logits, target, present) > plain(logits, target, present)
    assert isinstance(
        build_task_loss(TaskSpec("skin", "segmentation", "skin")), MaskedSegmentationLoss
    )


def test_masked_mean_weights_by_presence():
    values = torch.tensor([1.0, 100.0, 3.0])
    assert masked_mean(values, torch.tensor([True, False, True])).item() == 2.0
    assert masked_mean(values, torch.tensor([False, False, False])).item() == 0.0
