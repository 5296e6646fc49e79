"""Tests of the multi-task loss weighting strategies (``ssl_mt.losses.weighting``)."""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch

from ssl_mt.losses.weighting import (
    FAMO,
    WEIGHTINGS,
    DynamicWeightAverage,
    FixedWeighting,
    LossWeighting,
    UncertaintyWeighting,
    build_weighting,
)

TASKS = ("skin", "blur", "tone")


def _losses(*values: float, requires_grad: bool = True) -> dict[str, torch.Tensor]:
    return {
        name: torch.tensor(float(v), requires_grad=requires_grad)
        for name, v in zip(TASKS, values, strict=True)
    }


def _present(*flags: bool) -> dict[str, torch.Tensor]:
    return {name: torch.tensor(bool(f)) for name, f in zip(TASKS, flags, strict=True)}


ALL = _present(True, True, True)


# --------------------------------------------------------------------------------------------
# fixed


def test_fixed_is_the_weighted_sum_of_present_tasks() -> None:
    weighting = FixedWeighting(TASKS, {"skin": 2.0, "tone": 0.5})
    total, weights = weighting(_losses(1.5, 0.7, 3.0), ALL)
    assert total.item() == pytest.approx(2.0 * 1.5 + 1.0 * 0.7 + 0.5 * 3.0)
    assert {k: v.item() for k, v in weights.items()} == {"skin": 2.0, "blur": 1.0, "tone": 0.5}
    assert all(not w.requires_grad and w.dim() == 0 for w in weights.values())

    total, _ = weighting(_losses(1.5, 0.7, 0.0), _present(True, True, False))
    assert total.item() == pytest.approx(2.0 * 1.5 + 0.7)


def test_fixed_rejects_bad_base_weights() -> None:
    with pytest.raises(ValueError, match=r"unknown task.*segm"):
        FixedWeighting(TASKS, {"segm": 1.0})
    with pytest.raises(ValueError, match="positive"):
        FixedWeighting(TASKS, {"skin": 0.0})
    with pytest.raises(ValueError, match="positive"):
        FixedWeighting(TASKS, {"skin": float("nan")})
    with pytest.raises(ValueError, match="duplicate"):
        FixedWeighting(("a", "a"))
    with pytest.raises(ValueError, match="empty"):
        FixedWeighting(())


def test_forward_rejects_mismatched_task_mappings() -> None:
    weighting = FixedWeighting(TASKS)
    losses = _losses(1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"missing \['tone'\]"):
        weighting({k: v for k, v in losses.items() if k != "tone"}, ALL)
    with pytest.raises(ValueError, match=r"unknown \['extra'\]"):
        weighting(losses, {**ALL, "extra": torch.tensor(True)})
    with pytest.raises(ValueError, match="0-dim"):
        weighting({**losses, "skin": torch.ones(2)}, ALL)


# --------------------------------------------------------------------------------------------
# uncertainty


def test_uncertainty_learns_larger_variance_for_the_noisier_task() -> None:
    # Two regressions of the same target through one shared parameter; task "noisy" sees 10x
    # the noise std. Kendall et al.: the optimum is s_i = log(L_i), so the noisy task gets the
    # larger log-variance and the smaller weight.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, generator=gen)
    clean_y = 2.0 * x + 0.1 * torch.randn(512, generator=gen)
    noisy_y = 2.0 * x + 1.0 * torch.randn(512, generator=gen)
    theta = torch.nn.Parameter(torch.zeros(()))
    weighting = UncertaintyWeighting(["clean", "noisy"])
    optimizer = torch.optim.Adam([theta, *weighting.parameters()], lr=0.05)
    present = {"clean": torch.tensor(True), "noisy": torch.tensor(True)}
    for _ in range(400):
        pred = theta * x
        losses = {
            "clean": ((pred - clean_y) ** 2).mean(),
            "noisy": ((pred - noisy_y) ** 2).mean(),
        }
        total, weights = weighting(losses, present)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    s_clean, s_noisy = weighting.log_vars.detach().tolist()
    assert s_noisy > s_clean + 2.0  # variance ratio ~100 -> log ratio ~4.6 minus the shared error
    assert weights["clean"].item() > 10 * weights["noisy"].item()
    assert weights["noisy"].item() == pytest.approx(math.exp(-s_noisy))
    # At convergence s_i ~ log(L_i) (stationary point of exp(-s) L + s).
    assert s_clean == pytest.approx(math.log(losses["clean"].item()), abs=0.3)
    assert s_noisy == pytest.approx(math.log(losses["noisy"].item()), abs=0.3)


def test_uncertainty_formula_and_absent_task_gives_zero_gradient() -> None:
    weighting = UncertaintyWeighting(TASKS, {"skin": 2.0})
    with torch.no_grad():
        weighting.log_vars.copy_(torch.tensor([0.5, -1.0, 0.3]))
    losses = _losses(1.2, 0.4, 0.0)
    total, weights = weighting(losses, _present(True, True, False))
    expected = 2.0 * math.exp(-0.5) * 1.2 + 0.5 + math.exp(1.0) * 0.4 - 1.0
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert weights["skin"].item() == pytest.approx(2.0 * math.exp(-0.5), rel=1e-6)
    total.backward()
    grad = weighting.log_vars.grad
    assert grad[2].item() == 0.0  # absent: the +s regulariser must not push s down
    assert grad[0].item() == pytest.approx(1.0 - 2.0 * math.exp(-0.5) * 1.2, rel=1e-6)
    assert losses["skin"].grad.item() == pytest.approx(weights["skin"].item(), rel=1e-6)


# --------------------------------------------------------------------------------------------
# DWA


def test_dwa_weights_are_one_for_two_epochs_then_favour_the_stagnating_task() -> None:
    weighting = DynamicWeightAverage(["a", "b"], temperature=2.0)
    present = {"a": torch.tensor(True), "b": torch.tensor(True)}
    losses = {"a": torch.tensor(1.0), "b": torch.tensor(1.0)}

    def weights() -> dict[str, float]:
        return {k: v.item() for k, v in weighting(losses, present)[1].items()}

    assert weights() == {"a": 1.0, "b": 1.0}
    weighting.epoch_end({"a": 1.0, "b": 1.0})
    assert weights() == {"a": 1.0, "b": 1.0}
    weighting.epoch_end({"a": 0.5, "b": 0.95})  # a dropped fast, b stagnated
    w = weights()
    assert w["b"] > w["a"]
    assert w["a"] + w["b"] == pytest.approx(2.0)  # K = number of tasks
    expected_b = 2 * math.exp(0.95 / 2) / (math.exp(0.5 / 2) + math.exp(0.95 / 2))
    assert w["b"] == pytest.approx(expected_b, rel=1e-6)
    total, _ = weighting({"a": torch.tensor(2.0), "b": torch.tensor(3.0)}, present)
    assert total.item() == pytest.approx(2.0 * w["a"] + 3.0 * w["b"], rel=1e-6)

    # Only the last two epochs count; the counter stays capped.
    weighting.epoch_end({"a": 0.5, "b": 0.95})
    assert weighting.epochs_seen.item() == 2
    assert weights() == pytest.approx({"a": 1.0, "b": 1.0})


def test_dwa_missing_task_is_neutral_and_unknown_task_raises() -> None:
    # Previous losses other than 1: a DWA that forgot to divide by them (w = L(t-1)) fails.
    weighting = DynamicWeightAverage(TASKS, temperature=1.0)
    weighting.epoch_end({"skin": 2.0, "blur": 0.5, "tone": 4.0})
    weighting.epoch_end({"skin": 0.5, "blur": 1.5})  # tone had no labels this epoch
    lam = weighting.lambdas
    expected = 3 * torch.softmax(torch.tensor([0.5 / 2.0, 1.5 / 0.5, 1.0]), 0)
    torch.testing.assert_close(lam, expected)
    assert lam.sum().item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="unknown task"):
        weighting.epoch_end({"scalp": 1.0})
    with pytest.raises(ValueError, match="temperature"):
        DynamicWeightAverage(TASKS, temperature=0.0)


# --------------------------------------------------------------------------------------------
# FAMO


def _reference_famo(
    loss_sequence: list[list[float]], lr: float = 0.025, gamma: float = 0.001, eps: float = 1e-8
) -> list[tuple[torch.Tensor, float, torch.Tensor]]:
    """Plain FAMO as written in the paper (every task present), with torch.optim.Adam.

    The loss of step t+1 stands in for the re-evaluated loss of step t. Returns, per step, the
    logits, the total loss and the gradient weights c * z_i / (L_i + eps).
    """
    w = torch.zeros(len(loss_sequence[0]), requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr, weight_decay=gamma)
    out, prev = [], None
    for values in loss_sequence:
        cur = torch.tensor(values)
        if prev is not None:
            delta = torch.log(prev + eps) - torch.log(cur + eps)
            (d,) = torch.autograd.grad(torch.softmax(w, -1), w, grad_outputs=delta)
            opt.zero_grad()
            w.grad = d
            opt.step()
        z = torch.softmax(w.detach(), -1)
        c = 1.0 / (z / (cur + eps)).sum()
        total = (c * z * torch.log(cur + eps)).sum().item()
        out.append((w.detach().clone(), total, c * z / (cur + eps)))
        prev = cur
    return out


def test_famo_matches_a_plain_implementation_of_the_paper() -> None:
    sequence = [[2.0, 1.0, 0.5], [1.5, 0.99, 0.45], [1.0, 0.98, 0.44], [0.7, 0.9, 0.2]]
    weighting = FAMO(TASKS)
    for values, (ref_logits, ref_total, ref_weights) in zip(
        sequence, _reference_famo(sequence), strict=True
    ):
        losses = _losses(*values)
        total, weights = weighting(losses, ALL)
        torch.testing.assert_close(weighting.logits, ref_logits, rtol=1e-5, atol=1e-6)
        assert total.item() == pytest.approx(ref_total, rel=1e-5)
        got = torch.stack([weights[n] for n in TASKS])
        torch.testing.assert_close(got, ref_weights, rtol=1e-5, atol=1e-7)
        assert got.sum().item() == pytest.approx(1.0, rel=1e-6)
    # The logits did move (otherwise the comparison above proves little).
    assert weighting.logits.abs().max().item() > 0.01
    # First step by hand: uniform z, so weights are (1/L_i) / sum_j (1/L_j).
    first = FAMO(TASKS)
    _, weights = first(_losses(*sequence[0]), ALL)
    inv = [1 / v for v in sequence[0]]
    assert weights["skin"].item() == pytest.approx(inv[0] / sum(inv), rel=1e-6)


def test_famo_raises_the_weight_of_the_slowly_improving_task() -> None:
    weighting = FAMO(["fast", "slow"])
    present = {"fast": torch.tensor(True), "slow": torch.tensor(True)}
    ratios = []
    for t in range(100):
        losses = {
            "fast": torch.tensor(math.exp(-0.05 * t), requires_grad=True),
            "slow": torch.tensor(math.exp(-0.005 * t), requires_grad=True),
        }
        weighting(losses, present)
        z = weighting.probabilities()
        ratios.append((z[1] / z[0]).item())
    assert ratios[0] == pytest.approx(1.0)
    assert all(b > a for a, b in itertools.pairwise(ratios))
    assert weighting.probabilities()[1].item() > 0.9


def test_famo_gradient_is_c_z_over_loss() -> None:
    weighting = FAMO(TASKS, base_weights={"tone": 3.0}, eps=1e-3)
    for values in ([1.0, 2.0, 3.0], [0.5, 1.9, 2.5], [0.2, 1.8, 2.4]):
        weighting(_losses(*values), ALL)
    losses = _losses(0.1, 1.7, 2.3)
    total, weights = weighting(losses, ALL)
    total.backward()
    z = weighting.probabilities()
    values = torch.tensor([0.1, 1.7, 2.3])
    c = 1.0 / (z / (values + 1e-3)).sum()
    expected = c * z / (values + 1e-3) * torch.tensor([1.0, 1.0, 3.0])
    for i, name in enumerate(TASKS):
        assert losses[name].grad.item() == pytest.approx(expected[i].item(), rel=1e-5)
        assert weights[name].item() == pytest.approx(losses[name].grad.item(), rel=1e-6)
    assert not torch.allclose(z, torch.full_like(z, 1 / 3))  # the z_i factor was exercised


def test_famo_zero_and_absent_losses_stay_finite_and_absent_logits_do_not_move() -> None:
    weighting = FAMO(TASKS)
    weighting(_losses(1.0, 1.0, 1.0), ALL)
    weighting(_losses(0.5, 0.9, 0.99), ALL)
    frozen = {k: v.clone() for k, v in weighting.state_dict().items()}
    for step in range(5):
        losses = _losses(0.0 if step % 2 else 0.3, 0.8 - 0.1 * step, 0.0)
        total, weights = weighting(losses, _present(True, True, False))
        assert torch.isfinite(total)
        total.backward()
        assert losses["tone"].grad.item() == 0.0
        assert weights["tone"].item() == 0.0
        assert (weights["skin"] + weights["blur"]).item() == pytest.approx(1.0, rel=1e-6)
        assert all(torch.isfinite(w) for w in weights.values())
        assert all(torch.isfinite(g.grad) for g in losses.values())
    for name, buf in weighting.state_dict().items():
        assert torch.isfinite(buf.float()).all(), name
    for name in ("logits", "exp_avg", "exp_avg_sq", "steps"):
        assert torch.equal(weighting.state_dict()[name][2], frozen[name][2]), name
    assert not torch.equal(weighting.logits[:2], frozen["logits"][:2])


def test_famo_absent_task_behaves_as_if_it_did_not_exist() -> None:
    three, two = FAMO(TASKS), FAMO(TASKS[:2])
    for step in range(6):
        values = [1.0 / (step + 1), 0.95**step]
        present_two = {n: torch.tensor(True) for n in TASKS[:2]}
        tone_present = step == 0  # labeled once, then absent: its logit must not matter
        total3, weights3 = three(_losses(*values, 0.7), _present(True, True, tone_present))
        losses_two = {
            n: torch.tensor(v, requires_grad=True) for n, v in zip(TASKS[:2], values, strict=True)
        }
        total2, weights2 = two(losses_two, present_two)
        if step > 0:
            torch.testing.assert_close(total3, total2)
            for name in TASKS[:2]:
                torch.testing.assert_close(weights3[name], weights2[name])
    torch.testing.assert_close(three.logits[:2], two.logits)


def test_famo_eval_mode_changes_no_state() -> None:
    weighting = FAMO(TASKS)
    weighting(_losses(1.0, 1.0, 1.0), ALL)
    weighting(_losses(0.5, 0.9, 0.99), ALL)
    before = {k: v.clone() for k, v in weighting.state_dict().items()}
    weighting.eval()
    weighting(_losses(0.1, 0.1, 0.1), ALL)
    assert all(torch.equal(before[k], v) for k, v in weighting.state_dict().items())


# --------------------------------------------------------------------------------------------
# every strategy


def _warm_up(weighting: LossWeighting) -> None:
    """Drive a strategy into a non-initial state."""
    if isinstance(weighting, UncertaintyWeighting):
        with torch.no_grad():
            weighting.log_vars.copy_(torch.tensor([0.3, -0.7, 1.1]))
    for epoch, values in enumerate(([1.0, 2.0, 3.0], [0.6, 1.9, 2.0], [0.3, 1.85, 1.5])):
        weighting(_losses(*values), _present(True, epoch != 1, True))
        weighting.epoch_end(dict(zip(TASKS, values, strict=True)))


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
def test_state_dict_round_trip_reproduces_the_next_call(name: str) -> None:
    original = build_weighting(name, TASKS, {"blur": 0.5})
    _warm_up(original)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = build_weighting(name, TASKS, {"blur": 0.5})
    restored.load_state_dict(torch.load(buffer))
    fresh = build_weighting(name, TASKS, {"blur": 0.5})
    for values, flags in (([0.2, 1.8, 1.0], (True, True, True)), ([0.1, 1.7, 0.0], (1, 1, 0))):
        expected = original(_losses(*values), _present(*flags))
        got = restored(_losses(*values), _present(*flags))
        assert torch.equal(expected[0], got[0])
        assert all(torch.equal(expected[1][n], got[1][n]) for n in TASKS)
    # The state that only matters at the next epoch end must have travelled too.
    for weighting in (original, restored):
        weighting.epoch_end(dict(zip(TASKS, [0.1, 1.8, 0.5], strict=True)))
    expected = original(_losses(0.3, 1.0, 1.0), ALL)
    got = restored(_losses(0.3, 1.0, 1.0), ALL)
    assert torch.equal(expected[0], got[0])
    assert all(torch.equal(expected[1][n], got[1][n]) for n in TASKS)
    for key, value in original.state_dict().items():
        assert torch.equal(value.nan_to_num(), restored.state_dict()[key].nan_to_num()), key
    # Only meaningful if the state differs from a fresh module (fixed has none).
    if name != "fixed":
        again = build_weighting(name, TASKS, {"blur": 0.5})
        again.load_state_dict(original.state_dict())
        from_fresh = fresh(_losses(0.2, 1.8, 1.0), ALL)[1]
        from_state = again(_losses(0.2, 1.8, 1.0), ALL)[1]
        assert any(not torch.equal(from_fresh[n], from_state[n]) for n in TASKS)


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
def test_all_tasks_absent_gives_exact_zero_with_grad(name: str) -> None:
    weighting = build_weighting(name, TASKS)
    _warm_up(weighting)
    x = torch.tensor(1.5, requires_grad=True)
    losses = {n: x * 0.0 for n in TASKS}  # exactly 0.0, attached to the graph
    total, weights = weighting(losses, _present(False, False, False))
    assert total.item() == 0.0
    assert total.requires_grad
    total.backward()
    assert x.grad.item() == 0.0
    assert all(torch.isfinite(w) for w in weights.values())
    for key, value in weighting.state_dict().items():
        if key != "epoch_losses":  # DWA stores NaN for "no loss known"; not used here
            assert torch.isfinite(value.float()).all(), key


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
def test_non_finite_loss_of_an_absent_task_does_not_leak(name: str) -> None:
    clean, dirty = build_weighting(name, TASKS), build_weighting(name, TASKS)
    _warm_up(clean)
    _warm_up(dirty)
    present = _present(True, False, True)
    expected, _ = clean(_losses(0.4, 0.0, 0.9), present)
    total, weights = dirty(_losses(0.4, float("nan"), 0.9), present)
    assert torch.equal(total, expected)
    assert all(torch.isfinite(w) for w in weights.values())
    for key, value in dirty.state_dict().items():
        assert torch.equal(value.nan_to_num(), clean.state_dict()[key].nan_to_num()), key


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
def test_state_does_not_grow_with_steps(name: str) -> None:
    weighting = build_weighting(name, TASKS)
    sizes = {k: v.numel() for k, v in weighting.state_dict().items()}
    for _ in range(20):
        _warm_up(weighting)
    assert {k: v.numel() for k, v in weighting.state_dict().items()} == sizes


def test_build_weighting_names_and_options() -> None:
    assert isinstance(build_weighting("FAMO", TASKS), FAMO)
    assert build_weighting("dwa", TASKS, temperature=4.0).temperature == 4.0
    with pytest.raises(ValueError, match=r"'gradnorm'.*dwa.*famo.*fixed.*uncertainty"):
        build_weighting("gradnorm", TASKS)
    with pytest.raises(ValueError, match=r"temperatur.*options are \['temperature'\]"):
        build_weighting("dwa", TASKS, temperatur=2.0)
    assert set(WEIGHTINGS) == {"fixed", "uncertainty", "dwa", "famo"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
def test_forward_does_not_synchronise_on_cuda(name: str) -> None:
    weighting = build_weighting(name, TASKS)
    _warm_up(weighting)
    weighting.cuda()
    losses = {n: torch.rand((), device="cuda", requires_grad=True) for n in TASKS}
    present = {n: torch.rand((), device="cuda") > 0.3 for n in TASKS}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            total, _ = weighting(losses, present)
            total.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
