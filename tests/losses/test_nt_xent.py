"""NT-Xent: equal to independent references, lower for agreeing views, correct under DDP."""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ssl_mt.losses import nt_xent
from ssl_mt.losses.nt_xent import NTXentLoss, nt_xent_loss
from tests.gloo import gloo_group, spawn_gloo

ROOT = Path(__file__).resolve().parents[2]


# -- independent references -----------------------------------------------------------------
def reference_matrix(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """The classic form: a 2N×2N cosine-similarity matrix, diagonal masked, row i's positive
    is row i±N."""
    n = z1.shape[0]
    z = torch.cat([z1, z2]).double()
    z = z / z.norm(dim=1, keepdim=True)
    sim = z @ z.T / temperature
    sim = sim - torch.diag(torch.full((2 * n,), float("inf"), dtype=sim.dtype))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    return -log_prob[torch.arange(2 * n), positives].mean()


def reference_loop(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> float:
    """The paper's definition, one anchor at a time, in plain Python floats."""
    views = [*z1.double().tolist(), *z2.double().tolist()]
    n = z1.shape[0]

    def cos(a: list[float], b: list[float]) -> float:
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))

    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        denominator = sum(
            math.exp(cos(views[i], views[k]) / temperature) for k in range(2 * n) if k != i
        )
        total += -math.log(math.exp(cos(views[i], views[positive]) / temperature) / denominator)
    return total / (2 * n)


@pytest.mark.parametrize(
    ("batch", "dim", "temperature", "seed"),
    [(2, 3, 0.1, 0), (5, 16, 0.5, 1), (8, 4, 1.0, 2), (16, 32, 0.07, 3)],
)
def test_equals_independent_references(batch: int, dim: int, temperature: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(batch, dim, generator=gen) * 3  # unnormalised: the loss normalises
    z2 = torch.randn(batch, dim, generator=gen)
    loss = nt_xent_loss(z1, z2, temperature)
    assert loss.item() == pytest.approx(reference_matrix(z1, z2, temperature).item(), rel=1e-5)
    assert loss.item() == pytest.approx(reference_loop(z1, z2, temperature), rel=1e-5)
    assert NTXentLoss(temperature)(z1, z2).item() == pytest.approx(loss.item(), rel=1e-6)


def test_is_symmetric_in_the_views_and_scale_invariant():
    gen = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen)
    loss = nt_xent_loss(z1, z2, 0.2)
    assert nt_xent_loss(z2, z1, 0.2).item() == pytest.approx(loss.item(), rel=1e-5)
    assert nt_xent_loss(5 * z1, 0.1 * z2, 0.2).item() == pytest.approx(loss.item(), rel=1e-5)


def test_falls_when_the_views_agree():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(32, 16, generator=gen)
    agreeing = nt_xent_loss(z, z + 0.05 * torch.randn(32, 16, generator=gen), 0.1)
    unrelated = nt_xent_loss(z, torch.randn(32, 16, generator=gen), 0.1)
    # Random pairs sit near log(2N - 1); nearly identical pairs far below it.
    assert unrelated.item() > math.log(63) - 1.0
    assert agreeing.item() < 0.5 * unrelated.item()


def test_gradient_pulls_the_positive_closer():
    gen = torch.Generator().manual_seed(0)
    z1 = torch.randn(8, 4, generator=gen, requires_grad=True)
    z2 = torch.randn(8, 4, generator=gen)
    before = F.cosine_similarity(z1, z2).mean()
    nt_xent_loss(z1, z2, 0.5).backward()
    with torch.no_grad():
        after = F.cosine_similarity(z1 - 0.5 * z1.grad, z2).mean()
    assert after > before


@pytest.mark.parametrize("temperature", [0.0, -0.1])
def test_rejects_a_temperature_that_is_not_positive(temperature: float):
    with pytest.raises(ValueError, match=r"temperature must be > 0"):
        NTXentLoss(temperature)


def test_rejects_views_of_different_shapes():
    with pytest.raises(ValueError, match=r"two \(B, D\) tensors of one shape"):
        NTXentLoss(0.1)(torch.randn(4, 8), torch.randn(3, 8))


# -- DDP: 2 gloo processes on the CPU against one process on the concatenated batch ---------
WORLD, LOCAL_BATCH, IN_DIM, OUT_DIM, TEMPERATURE = 2, 4, 6, 5, 0.2
STORE_TIMEOUT = timedelta(seconds=120)


def make_problem() -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    """The shared projection and the global batch [rank0; rank1] of both views."""
    torch.manual_seed(0)
    projection = torch.nn.Linear(IN_DIM, OUT_DIM)
    gen = torch.Generator().manual_seed(1)
    x1 = torch.randn(WORLD * LOCAL_BATCH, IN_DIM, generator=gen)
    x2 = x1 + 0.3 * torch.randn(WORLD * LOCAL_BATCH, IN_DIM, generator=gen)
    return projection, x1, x2


def _gather_without_grad(x: torch.Tensor) -> torch.Tensor:
    """The classic bug: a plain all_gather, whose outputs carry no gradient."""
    import torch.distributed as dist

    parts = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def _rank_step(projection: torch.nn.Linear, x1, x2, rank: int) -> dict[str, torch.Tensor]:
    """One rank's loss and the DDP-averaged gradients of the projection."""
    import torch.distributed as dist

    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    projection.zero_grad()
    loss = nt_xent_loss(projection(x1[rows]), projection(x2[rows]), TEMPERATURE)
    loss.backward()
    out = {"loss": loss.detach().clone()}
    for name, param in projection.named_parameters():
        grad = param.grad.clone()
        dist.all_reduce(grad)
        out[name] = grad / dist.get_world_size()  # what DDP does
    dist.all_reduce(out["loss"])
    out["loss"] /= dist.get_world_size()
    return out


def _ddp_worker(rank: int, port: int, result_path: str) -> None:
    with gloo_group(rank, port, WORLD, STORE_TIMEOUT):
        projection, x1, x2 = make_problem()
        with_grad = _rank_step(projection, x1, x2, rank)
        original = nt_xent.gather_with_grad
        nt_xent.gather_with_grad = _gather_without_grad
        try:
            without_grad = _rank_step(projection, x1, x2, rank)
        finally:
            nt_xent.gather_with_grad = original
        if rank == 0:
            torch.save({"with_grad": with_grad, "without_grad": without_grad}, result_path)
        dist.barrier()


@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_ddp_gradients_equal_one_process_on_the_global_batch(tmp_path, monkeypatch):
    # The spawned processes import this module by name: make the repository importable.
    monkeypatch.syspath_prepend(str(ROOT))
    result = tmp_path / "ranks.pt"
    spawn_gloo(_ddp_worker, WORLD, str(result))
    ranks = torch.load(result)

    projection, x1, x2 = make_problem()
    reference = nt_xent_loss(projection(x1), projection(x2), TEMPERATURE)
    reference.backward()
    expected = {"loss": reference.detach()}
    expected.update({name: param.grad for name, param in projection.named_parameters()})

    ddp = ranks["with_grad"]
    torch.testing.assert_close(ddp["loss"], expected["loss"], atol=1e-5, rtol=1e-5)
    for name in ("weight", "bias"):
        torch.testing.assert_close(ddp[name], expected[name], atol=1e-5, rtol=1e-5)

    # The same forward without gradients through the gather: same loss, wrong gradients.
    buggy = ranks["without_grad"]
    torch.testing.assert_close(buggy["loss"], expected["loss"], atol=1e-5, rtol=1e-5)
    assert (buggy["weight"] - expected["weight"]).abs().max() > 1e-3
