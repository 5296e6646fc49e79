"""Losses of MoCo, BYOL, SimSiam, DINO and RotNet against plain reference computations."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_mt.losses.byol_loss import byol_loss, negative_cosine, normalized_mse, simsiam_loss
from ssl_mt.losses.dino_loss import DINOLoss, dino_cross_entropy
from ssl_mt.losses.info_nce import info_nce_logits, info_nce_loss
from ssl_mt.models.rotation import rotate_batch


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


# -- InfoNCE with a queue (MoCo) ----------------------------------------------------------------
def test_info_nce_with_a_queue_matches_a_plain_loop():
    q = torch.randn(3, 5, generator=gen(0), dtype=torch.float64)
    k = torch.randn(3, 5, generator=gen(1), dtype=torch.float64)
    queue = torch.nn.functional.normalize(torch.randn(7, 5, generator=gen(2)), dim=1)
    temperature = 0.2
    expected = 0.0
    for i in range(3):
        qi, ki = unit(q[i].tolist()), unit(k[i].tolist())
        positive = math.exp(dot(qi, ki) / temperature)
        negatives = sum(math.exp(dot(qi, n.tolist()) / temperature) for n in queue)
        expected += -math.log(positive / (positive + negatives)) / 3
    loss = info_nce_loss(q.float(), k.float(), queue, temperature)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    logits = info_nce_logits(q.float(), k.float(), queue, temperature)
    assert logits.shape == (3, 1 + 7)


def test_info_nce_sends_gradient_to_the_queries_only():
    q = torch.randn(4, 8, generator=gen(0), requires_grad=True)
    k = torch.randn(4, 8, generator=gen(1), requires_grad=True)
    queue = torch.randn(16, 8, generator=gen(2), requires_grad=True)
    info_nce_loss(q, k, queue).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None and queue.grad is None


def test_info_nce_is_low_when_the_query_matches_its_key_and_not_the_queue():
    k = torch.nn.functional.normalize(torch.randn(1, 16, generator=gen(0)), dim=1)
    queue = -k.repeat(4, 1)  # every negative points away from the key
    # log(1 + 4 exp(-2 / 0.1)) ≈ 8e-9
    assert info_nce_loss(k, k, queue, 0.1).item() < 1e-6


# -- BYOL: normalised MSE = 2 - 2 cos -----------------------------------------------------------
def test_normalized_mse_is_the_squared_distance_of_unit_vectors():
    p = torch.randn(6, 5, generator=gen(0))
    z = torch.randn(6, 5, generator=gen(1))
    for i in range(6):
        pi, zi = unit(p[i].tolist()), unit(z[i].tolist())
        squared = sum((a - b) ** 2 for a, b in zip(pi, zi, strict=True))
        assert normalized_mse(p, z)[i].item() == pytest.approx(squared, abs=1e-6)
        assert squared == pytest.approx(2 - 2 * dot(pi, zi), abs=1e-6)


def test_byol_loss_is_symmetrised_and_ignores_the_scale_of_its_inputs():
    p1, p2, z1, z2 = (torch.randn(4, 8, generator=gen(s)) for s in range(4))
    expected = (normalized_mse(p1, z2) + normalized_mse(p2, z1)).mean()
    torch.testing.assert_close(byol_loss(p1, p2, z1, z2), expected)
    torch.testing.assert_close(byol_loss(3 * p1, p2, 0.1 * z1, z2), expected)
    assert byol_loss(z2, z1, z1, z2).item() == pytest.approx(0.0, abs=1e-6)


def test_byol_loss_sends_gradient_to_the_predictions_only():
    p1, p2, z1, z2 = (torch.randn(4, 8, generator=gen(s), requires_grad=True) for s in range(4))
    byol_loss(p1, p2, z1, z2).backward()
    assert p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0
    assert z1.grad is None and z2.grad is None


# -- SimSiam: negative cosine with stop-gradient ------------------------------------------------
def test_simsiam_loss_is_half_the_negative_cosines_of_both_directions():
    p1, p2, z1, z2 = (torch.randn(5, 6, generator=gen(s)) for s in range(4))

    def d(p: torch.Tensor, z: torch.Tensor) -> float:
        return -sum(
            dot(unit(a.tolist()), unit(b.tolist())) for a, b in zip(p, z, strict=True)
        ) / len(p)

    expected = d(p1, z2) / 2 + d(p2, z1) / 2
    assert simsiam_loss(p1, p2, z1, z2).item() == pytest.approx(expected, abs=1e-6)
    assert negative_cosine(z1, z1).item() == pytest.approx(-1.0, abs=1e-6)


def test_simsiam_gradient_does_not_flow_into_the_target_branch():
    """z feeds the predictor (gradient) and is the target (no gradient): only the first counts."""
    predictor = torch.nn.Linear(6, 6)
    z = torch.randn(8, 6, generator=gen(0), requires_grad=True)
    p1, p2 = predictor(z).chunk(2)
    z1, z2 = z.chunk(2)
    simsiam_loss(p1, p2, z1, z2).backward()
    through_loss = z.grad.clone()

    # Reference: the targets are constants, so z's gradient comes through the predictor alone.
    z.grad = None
    predictor.zero_grad()
    target1, target2 = z.detach().chunk(2)
    p1, p2 = predictor(z).chunk(2)

    def neg_cos(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (
            -((p / p.norm(dim=1, keepdim=True)) * (t / t.norm(dim=1, keepdim=True))).sum(1).mean()
        )

    (neg_cos(p1, target2) / 2 + neg_cos(p2, target1) / 2).backward()
    torch.testing.assert_close(through_loss, z.grad)

    # Without the stop-gradient the gradient would differ.
    z.grad = None
    p1, p2 = predictor(z).chunk(2)
    z1, z2 = z.chunk(2)
    (neg_cos(p1, z2) / 2 + neg_cos(p2, z1) / 2).backward()
    assert (z.grad - through_loss).abs().max() > 1e-4


# -- DINO: centred, sharpened teacher; pairs of different views; centre EMA ----------------------
def softmax(row: list[float]) -> list[float]:
    top = max(row)
    e = [math.exp(x - top) for x in row]
    return [x / sum(e) for x in e]


def reference_dino(student, teacher, center, ts, tt) -> float:
    """Average over (teacher view i, student view v != i) of the batch-mean cross-entropy."""
    total, pairs = 0.0, 0
    for i, t in enumerate(teacher):
        for v, s in enumerate(student):
            if v == i:
                continue
            ce = 0.0
            for row_t, row_s in zip(t.tolist(), s.tolist(), strict=True):
                pt = softmax([(a - c) / tt for a, c in zip(row_t, center, strict=True)])
                ps = softmax([a / ts for a in row_s])
                ce += -sum(a * math.log(b) for a, b in zip(pt, ps, strict=True))
            total += ce / len(t)
            pairs += 1
    return total / pairs


def test_dino_cross_entropy_matches_the_reference_over_pairs_of_different_views():
    k, batch = 7, 3
    teacher = [torch.randn(batch, k, generator=gen(i)) for i in range(2)]
    student = [torch.randn(batch, k, generator=gen(10 + v)) for v in range(5)]  # 2 global + 3
    center = torch.randn(1, k, generator=gen(99))
    loss = dino_cross_entropy(student, teacher, center, 0.1, 0.04)
    expected = reference_dino(student, teacher, center[0].tolist(), 0.1, 0.04)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # 2 teacher views × 5 student views − 2 same-view pairs = 8 terms: the same-view pairs
    # are left out (including them changes the value).
    with_same = reference_dino(student, teacher, center[0].tolist(), 0.1, 0.04) * 8
    for i in range(2):
        with_same += reference_dino(
            [student[i], student[i]], [teacher[i]], center[0].tolist(), 0.1, 0.04
        )
    assert abs(with_same / 10 - expected) > 1e-4


def test_dino_loss_uses_the_old_centre_then_moves_it_by_ema():
    k = 5
    criterion = DINOLoss(k, student_temperature=0.1, center_momentum=0.9)
    criterion.center.copy_(torch.randn(1, k, generator=gen(3)))
    old = criterion.center.clone()
    teacher = [torch.randn(4, k, generator=gen(i)) for i in range(2)]
    student = [torch.randn(4, k, generator=gen(5 + i), requires_grad=True) for i in range(3)]
    loss = criterion(student, teacher, teacher_temperature=0.04)
    assert loss.item() == pytest.approx(
        reference_dino(student, teacher, old[0].tolist(), 0.1, 0.04), rel=1e-5
    )
    batch_mean = torch.cat(teacher).mean(dim=0, keepdim=True)
    torch.testing.assert_close(criterion.center, 0.9 * old + 0.1 * batch_mean)
    loss.backward()
    assert all(s.grad is not None for s in student)
    assert "center" in criterion.state_dict()  # saved with checkpoints


def test_dino_centre_ignores_a_non_finite_teacher_batch():
    criterion = DINOLoss(3, center_momentum=0.9)
    criterion.center.copy_(torch.tensor([[0.5, -1.0, 2.0]]))
    old = criterion.center.clone()
    teacher = torch.randn(4, 3, generator=gen(0))
    teacher[1, 2] = float("nan")  # the step the non-finite guard skips
    criterion.update_center(teacher)
    assert torch.equal(criterion.center, old)


def test_dino_loss_needs_two_views():
    with pytest.raises(ValueError, match="at least two views"):
        dino_cross_entropy([torch.zeros(2, 3)], [torch.zeros(2, 3)], torch.zeros(3), 0.1, 0.04)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"student_temperature": 0.0}, r"method\.student_temperature must be > 0"),
        ({"center_momentum": 1.0}, r"method\.center_momentum must be in \[0, 1\)"),
    ],
)
def test_dino_loss_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DINOLoss(8, **kwargs)


# -- RotNet: the four rotations and their cross-entropy -----------------------------------------
def test_rotations_are_counter_clockwise_quarter_turns_labelled_k():
    image = torch.zeros(1, 1, 4, 4)
    image[0, 0, 0, 3] = 1.0  # top-right corner
    image[0, 0, 0, 2] = 0.5  # its left neighbour: makes the image asymmetric under flips
    rotated, labels = rotate_batch(image)
    assert labels.tolist() == [0, 1, 2, 3]
    corners = {0: (0, 3), 1: (0, 0), 2: (3, 0), 3: (3, 3)}  # top-right turned CCW k times
    neighbours = {0: (0, 2), 1: (1, 0), 2: (3, 1), 3: (2, 3)}
    for k in range(4):
        assert rotated[k, 0][corners[k]] == 1.0, k
        assert rotated[k, 0][neighbours[k]] == 0.5, k
        assert rotated[k].sum() == 1.5
    torch.testing.assert_close(rotated[1, 0], image[0, 0].T.flip(0))  # 90° CCW by hand


def test_rotation_batches_are_blocks_of_one_rotation_each():
    images = torch.randn(3, 3, 8, 8, generator=gen(0))
    rotated, labels = rotate_batch(images)
    assert rotated.shape == (12, 3, 8, 8)
    assert labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    for k in range(4):
        torch.testing.assert_close(rotated[3 * k : 3 * (k + 1)], torch.rot90(images, k, (2, 3)))


def test_rotation_cross_entropy_of_a_classifier_matches_a_plain_log_softmax():
    images = torch.randn(2, 3, 8, 8, generator=gen(1))
    rotated, labels = rotate_batch(images)
    classifier = torch.nn.Linear(3 * 8 * 8, 4)
    logits = classifier(rotated.flatten(1))
    loss = torch.nn.functional.cross_entropy(logits, labels)
    expected = 0.0
    for row, label in zip(logits.tolist(), labels.tolist(), strict=True):
        expected += -math.log(softmax(row)[label]) / len(labels)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_rotation_needs_square_images():
    with pytest.raises(ValueError, match="square"):
        rotate_batch(torch.zeros(1, 3, 8, 6))
