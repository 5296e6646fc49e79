"""The SSL losses compute their logits in float32 under ``precision=bf16-mixed`` (autocast).

``x.float()`` alone does not: autocast casts a matmul's inputs back to bfloat16 (the control
below). Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` each loss must give float32
logits and the float32 loss to 1e-6.
"""

from __future__ import annotations

import pytest
import torch

from ssl_mt.losses.dino_loss import dino_cross_entropy
from ssl_mt.losses.info_nce import info_nce_logits, info_nce_loss
from ssl_mt.losses.mim_loss import masked_reconstruction_loss
from ssl_mt.losses.nt_xent import nt_xent_logits, nt_xent_loss


def bf16_autocast() -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_control_float_does_not_keep_autocast_from_a_bf16_matmul():
    a, b = randn(8, 16), randn(16, 8, seed=1)
    with bf16_autocast():
        assert (a.float() @ b.float()).dtype == torch.bfloat16


def test_nt_xent_logits_and_loss_are_float32_under_autocast():
    z1, z2 = randn(8, 32), randn(8, 32, seed=1)
    expected = nt_xent_loss(z1, z2, 0.1)
    with bf16_autocast():
        logits, _ = nt_xent_logits(z1, z2, 0.1)
        loss = nt_xent_loss(z1, z2, 0.1)
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32
    assert float(loss) == pytest.approx(float(expected), abs=1e-6)


def test_info_nce_logits_and_loss_are_float32_under_autocast():
    q, k = randn(8, 32), randn(8, 32, seed=1)
    queue = torch.nn.functional.normalize(randn(64, 32, seed=2), dim=1)
    expected = info_nce_loss(q, k, queue, 0.2)
    with bf16_autocast():
        logits = info_nce_logits(q, k, queue, 0.2)
        loss = info_nce_loss(q, k, queue, 0.2)
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32
    assert float(loss) == pytest.approx(float(expected), abs=1e-6)


def test_dino_loss_is_float32_under_autocast():
    # Student outputs from a bf16 head, as under autocast: the loss upcasts them.
    student = [randn(8, 64, seed=s).bfloat16() for s in range(4)]
    teacher = [randn(8, 64, seed=10 + s).bfloat16() for s in range(2)]
    center = randn(1, 64, seed=20) * 0.1
    expected = dino_cross_entropy(student, teacher, center, 0.1, 0.04)
    with bf16_autocast():
        loss = dino_cross_entropy(student, teacher, center, 0.1, 0.04)
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(float(expected), abs=1e-6)


def test_mim_loss_is_float32_under_autocast():
    prediction, target = randn(2, 3, 16, 16), randn(2, 3, 16, 16, seed=1)
    mask = randn(2, 1, 16, 16, seed=2) > 0
    for kind in ("l1", "l2"):
        expected = masked_reconstruction_loss(prediction, target, mask, kind)
        with bf16_autocast():
            loss = masked_reconstruction_loss(prediction, target, mask, kind)
        assert loss.dtype == torch.float32
        assert float(loss) == pytest.approx(float(expected), abs=1e-6)
