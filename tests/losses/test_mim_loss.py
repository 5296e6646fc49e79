"""Masked-image-modelling loss: masked pixels only, MAE's per-patch targets, global under DDP."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ssl_mt.losses import mim_loss
from ssl_mt.losses.mim_loss import masked_reconstruction_loss, normalize_patches
from tests.gloo import gloo_group, spawn_gloo

ROOT = Path(__file__).resolve().parents[2]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def patch_mask(batch: int, grid: int, patch: int, masked: list[list[int]]) -> torch.Tensor:
    """(B, 1, grid·patch, grid·patch) pixel mask; ``masked[b]`` lists sample b's patch numbers."""
    mask = torch.zeros(batch, grid * grid, dtype=torch.bool)
    for b, patches in enumerate(masked):
        mask[b, patches] = True
    mask = mask.view(batch, grid, grid)
    return mask.repeat_interleave(patch, 1).repeat_interleave(patch, 2).unsqueeze(1)


# -- targets ------------------------------------------------------------------------------------
def test_normalize_patches_gives_every_patch_zero_mean_and_unit_unbiased_variance():
    images = 3 * torch.randn(2, 3, 8, 12, generator=gen(0), dtype=torch.float64) + 5
    out = normalize_patches(images, 4, eps=0.0)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                patch = images[b, :, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4]
                expected = (patch - patch.mean()) / patch.flatten().var().sqrt()  # MAE's
                torch.testing.assert_close(
                    out[b, :, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4], expected
                )


def test_normalize_patches_refuses_images_that_are_not_whole_patches():
    with pytest.raises(ValueError, match=r"10×8 px is not a whole number of 4 px patches"):
        normalize_patches(torch.zeros(1, 3, 10, 8), 4)


# -- the loss -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_loss_is_the_mean_error_over_the_masked_pixel_values(kind: str):
    prediction = torch.randn(2, 3, 8, 8, generator=gen(1))
    target = torch.randn(2, 3, 8, 8, generator=gen(2))
    mask = patch_mask(2, 2, 4, [[0, 3], [1]])
    values = []
    for b in range(2):
        for y in range(8):
            for x in range(8):
                if mask[b, 0, y, x]:
                    for c in range(3):
                        d = float(prediction[b, c, y, x] - target[b, c, y, x])
                        values.append(abs(d) if kind == "l1" else d * d)
    assert len(values) == 3 * 3 * 16
    loss = masked_reconstruction_loss(prediction, target, mask, kind)
    assert loss.item() == pytest.approx(sum(values) / len(values), rel=1e-6)


def test_a_planted_difference_outside_the_mask_changes_nothing():
    prediction = torch.randn(2, 3, 8, 8, generator=gen(3), requires_grad=True)
    target = torch.randn(2, 3, 8, 8, generator=gen(4))
    mask = patch_mask(2, 2, 4, [[0], [2, 3]])
    loss = masked_reconstruction_loss(prediction, target, mask)
    loss.backward()
    grad = prediction.grad.clone()
    assert grad[~mask.expand_as(grad)].abs().max() == 0
    assert grad[mask.expand_as(grad)].abs().min() > 0

    planted_prediction = prediction.detach().clone()
    planted_target = target.clone()
    outside = ~mask.expand_as(target)
    planted_prediction[outside] += 100.0
    planted_target[outside] = float("nan")  # not even NaN outside the mask leaks in
    planted_prediction[0, 0, 7, 7] = float("inf")  # patch 3 of sample 0: unmasked
    planted_prediction.requires_grad_(True)
    planted = masked_reconstruction_loss(planted_prediction, planted_target, mask)
    assert planted.item() == loss.item()
    planted.backward()
    assert torch.equal(planted_prediction.grad, grad)

    # ...whereas the same change inside the mask does.
    inside = prediction.detach().clone()
    inside[0, 0, 0, 0] += 1.0  # patch 0 of sample 0: masked
    assert masked_reconstruction_loss(inside, target, mask).item() != loss.item()


def test_unknown_loss_kind_is_named():
    with pytest.raises(ValueError, match=r"method\.loss must be one of \('l1', 'l2'\), got 'l3'"):
        masked_reconstruction_loss(
            torch.zeros(1, 3, 4, 4),
            torch.zeros(1, 3, 4, 4),
            torch.ones(1, 1, 4, 4, dtype=torch.bool),
            "l3",
        )


# -- DDP: 2 gloo processes on the CPU against one process on the concatenated batch ---------
WORLD, LOCAL_BATCH, PATCH, GRID = 2, 2, 4, 3
STORE_TIMEOUT = timedelta(seconds=120)
# Uneven masks: rank 0's images hide 7 and 5 patches, rank 1's 1 and 2. A mean of the ranks'
# local means would weight rank 1's few pixels as much as rank 0's many.
MASKED = [[0, 1, 2, 3, 4, 5, 6], [2, 4, 6, 7, 8], [4], [0, 8]]


def make_problem() -> tuple[torch.nn.Conv2d, torch.Tensor, torch.Tensor]:
    """A shared convolution (the "network"), the global batch and its masks."""
    torch.manual_seed(0)
    network = torch.nn.Conv2d(3, 3, kernel_size=3, padding=1)
    size = GRID * PATCH
    images = torch.randn(WORLD * LOCAL_BATCH, 3, size, size, generator=gen(5))
    images[LOCAL_BATCH:] *= 4  # rank 1's errors are larger: the two means differ clearly
    mask = patch_mask(WORLD * LOCAL_BATCH, GRID, PATCH, MASKED)
    return network, images, mask


def _loss(network: torch.nn.Conv2d, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    masked = torch.where(mask, torch.zeros_like(images), images)
    return masked_reconstruction_loss(network(masked), normalize_patches(images, PATCH), mask, "l2")


def _rank_step(network, images, mask, rank: int) -> dict[str, torch.Tensor]:
    """One rank's loss and the DDP-averaged gradients."""
    import torch.distributed as dist

    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    network.zero_grad()
    loss = _loss(network, images[rows], mask[rows])
    loss.backward()
    out = {"loss": loss.detach().clone()}
    for name, param in network.named_parameters():
        grad = param.grad.clone()
        dist.all_reduce(grad)
        out[name] = grad / dist.get_world_size()  # what DDP does
    dist.all_reduce(out["loss"])
    out["loss"] /= dist.get_world_size()  # what a synced epoch mean of the logged loss does
    return out


def _ddp_worker(rank: int, port: int, result_path: str) -> None:
    with gloo_group(rank, port, WORLD, STORE_TIMEOUT):
        network, images, mask = make_problem()
        global_mean = _rank_step(network, images, mask, rank)
        original = mim_loss._world
        mim_loss._world = lambda: 1  # the bug: each rank's own mean, no global count
        try:
            local_mean = _rank_step(network, images, mask, rank)
        finally:
            mim_loss._world = original
        if rank == 0:
            torch.save({"global": global_mean, "local": local_mean}, result_path)
        dist.barrier()


@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_ddp_loss_and_gradients_equal_one_process_on_the_global_batch(tmp_path, monkeypatch):
    # The spawned processes import this module by name: make the repository importable.
    monkeypatch.syspath_prepend(str(ROOT))
    result = tmp_path / "ranks.pt"
    spawn_gloo(_ddp_worker, WORLD, str(result))
    ranks = torch.load(result)

    network, images, mask = make_problem()
    reference = _loss(network, images, mask)
    reference.backward()
    expected = {"loss": reference.detach()}
    expected.update({name: param.grad for name, param in network.named_parameters()})

    ddp = ranks["global"]
    for name in ("loss", "weight", "bias"):
        torch.testing.assert_close(ddp[name], expected[name], atol=1e-5, rtol=1e-5, msg=name)

    # Without the global count: each rank's mean, averaged — another loss, other gradients.
    buggy = ranks["local"]
    assert abs(buggy["loss"].item() - expected["loss"].item()) > 1e-3
    assert (buggy["weight"] - expected["weight"]).abs().max() > 1e-3
