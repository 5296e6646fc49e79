"""Optimiser groups, LARS without adaptation on biases/norms (``ssl_mt.optim``); the
global-batch lr rule, the warmup-cosine multiplier and resuming into a changed plan
(``ssl_mt.lr_plan``)."""

from __future__ import annotations

import io
import itertools
import logging
import math

import pytest
import torch
from timm.optim import Lars
from torch import nn

from ssl_mt.lr_plan import WarmupCosine, lambda_scheduler, plan_lr, same_progress, scaled_lr
from ssl_mt.optim import build_optimizer, decay_groups
from ssl_mt.schedule import ResolutionSchedule

LARS = {"name": "lars", "momentum": 0.9, "trust_coeff": 0.001, "weight_decay": 1e-4}


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.Flatten(),
        nn.LayerNorm(4 * 6 * 6),
        nn.Linear(4 * 6 * 6, 3),
    )


# -- parameter groups -------------------------------------------------------------------------
def test_biases_and_norm_parameters_get_no_weight_decay():
    net = small_net()
    groups = decay_groups(net, 0.05, lr_scale=0.5, tag="backbone")
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in net.parameters())  # each exactly once
    for group in groups:
        assert group["lr_scale"] == 0.5 and group["tag"] == "backbone"
        dims = {p.ndim for p in group["params"]}
        if group["weight_decay"] == 0:
            assert dims == {1}
        else:
            assert group["weight_decay"] == 0.05 and min(dims) >= 2
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    norms_and_biases = [
        *net[1].parameters(),
        *net[3].parameters(),
        net[0].bias,
        net[4].bias,
    ]
    assert {id(p) for p in norms_and_biases} == no_decay


def test_frozen_parameters_are_left_out():
    net = small_net()
    net[0].weight.requires_grad_(False)
    params = [p for g in decay_groups(net, 0.05) for p in g["params"]]
    assert all(p is not net[0].weight for p in params)


def test_lars_is_timm_lars_with_the_groups_decay_and_scaled_lr():
    net = small_net()
    groups = decay_groups(net[:2], 1e-4, lr_scale=0.1, tag="backbone")
    groups += decay_groups(net[2:], 1e-4, tag="head")
    optimizer = build_optimizer(groups, LARS, lr=2.0)
    assert isinstance(optimizer, Lars)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(2.0 * group["lr_scale"])
        assert group["momentum"] == 0.9 and group["trust_coeff"] == 0.001
        assert not group["always_adapt"]  # adaptation only where weight_decay != 0
        if any(p.ndim <= 1 for p in group["params"]):
            assert group["weight_decay"] == 0.0
            assert all(p.ndim <= 1 for p in group["params"])


def _updates(optimizer_factory, steps: int = 3) -> dict[str, torch.Tensor]:
    """Parameter changes of ``small_net`` after a few steps with the same given gradients."""
    net = small_net()
    optimizer = optimizer_factory(net)
    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for param in net.parameters():
            param.grad = torch.randn(param.shape, generator=gen)
        optimizer.step()
    return {n: p.detach() - start[n] for n, p in net.named_parameters()}


def test_lars_updates_no_decay_params_like_momentum_sgd_without_trust_ratio():
    lr = 0.5
    lars = _updates(lambda net: build_optimizer(decay_groups(net, 1e-4), LARS, lr))
    sgd = _updates(lambda net: torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9))
    names = [n for n, p in small_net().named_parameters()]
    one_d = [n for n, p in small_net().named_parameters() if p.ndim <= 1]
    assert one_d == ["0.bias", "1.weight", "1.bias", "3.weight", "3.bias", "4.bias"]
    for name in one_d:
        torch.testing.assert_close(lars[name], sgd[name], rtol=1e-6, atol=1e-7)
    # The weights are adapted (trust ratio), so this comparison can tell the two apart.
    for name in set(names) - set(one_d):
        ratio = lars[name].norm() / sgd[name].norm()
        assert not 0.5 < ratio < 2.0, f"{name}: LARS did not adapt the weight's update"


# -- lr rule --------------------------------------------------------------------------------
def test_scaled_lr_rules():
    assert scaled_lr(0.3, 4096, "linear") == pytest.approx(0.3 * 16)
    assert scaled_lr(0.3, 128, "linear", reference_batch=64) == pytest.approx(0.6)
    assert scaled_lr(0.075, 4096, "sqrt") == pytest.approx(0.075 * 64)
    assert scaled_lr(1e-3, 4096, "none") == 1e-3
    with pytest.raises(ValueError, match=r"lr_scaling must be one of .*'cube'"):
        scaled_lr(0.1, 256, "cube")
    with pytest.raises(ValueError, match=r"global batch size must be >= 1"):
        scaled_lr(0.1, 0, "linear")


OPTIM = {"base_lr": 0.3, "lr_scaling": "linear", "reference_batch": 256, "warmup_epochs": 2}


@pytest.mark.parametrize(
    ("world", "accumulate", "expected_global"),
    [(1, 1, 64), (4, 1, 256), (4, 2, 512), (2, 8, 1024)],
)
@pytest.mark.parametrize("rule", ["linear", "sqrt"])
def test_plan_lr_uses_the_global_batch(world, accumulate, expected_global, rule):
    schedule = ResolutionSchedule([{"size": 64, "epochs": 10, "batch_size": 64}])
    lr, _ = plan_lr({**OPTIM, "lr_scaling": rule}, schedule, 100_000, world, accumulate)
    if rule == "linear":
        assert lr == pytest.approx(0.3 * expected_global / 256)
    else:
        assert lr == pytest.approx(0.3 * math.sqrt(expected_global))


def test_plan_lr_counts_optimizer_steps_per_rank_and_accumulation():
    schedule = ResolutionSchedule([{"size": 64, "epochs": 10, "batch_size": 16}])
    # 1000 images over 4 ranks: 250 each, 15 full batches, 8 optimiser steps (accumulate 2).
    _, multiplier = plan_lr(OPTIM, schedule, 1000, world_size=4, accumulate=2)
    assert multiplier.total_steps == 80
    assert multiplier.warmup_steps == 16  # 2 warmup epochs
    _, single = plan_lr(OPTIM, schedule, 1000, world_size=1, accumulate=1)
    assert single.total_steps == 10 * (1000 // 16)


# -- multiplier -------------------------------------------------------------------------------
def test_warmup_is_linear_then_cosine_ends_at_min_ratio():
    fn = WarmupCosine(total_steps=110, warmup_steps=10, min_ratio=0.1)
    assert [fn(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert fn(10) == pytest.approx(1.0)
    assert fn(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way down the cosine
    assert fn(110) == pytest.approx(0.1)
    assert fn(500) == pytest.approx(0.1)  # stays at the floor past the end
    values = [fn(s) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))


@pytest.mark.parametrize(("rule", "factor"), [("linear", 0.25), ("sqrt", 0.5), ("none", 1.0)])
def test_a_later_stage_with_another_batch_rescales_the_lr(rule: str, factor: float):
    schedule = ResolutionSchedule(
        [
            {"size": 64, "epochs": 2, "batch_size": 32},
            {"size": 128, "epochs": 2, "batch_size": 8},
        ]
    )
    lr, fn = plan_lr(
        {**OPTIM, "lr_scaling": rule, "warmup_epochs": 0}, schedule, 640, world_size=2, accumulate=1
    )
    # Per rank 320 images: 10 steps per epoch at batch 32, then 40 at batch 8.
    assert fn.stage_starts == (0, 20)
    assert fn.stage_factors == pytest.approx((1.0, factor))
    assert fn.total_steps == 100
    cosine = WarmupCosine(total_steps=100)
    assert fn(19) == pytest.approx(cosine(19))
    assert fn(20) == pytest.approx(cosine(20) * factor)
    assert fn(99) == pytest.approx(cosine(99) * factor)
    assert lr == pytest.approx(scaled_lr(0.3, 64, rule))


def test_warmup_spans_epochs_of_several_stages():
    schedule = ResolutionSchedule(
        [
            {"size": 64, "epochs": 1, "batch_size": 10},
            {"size": 96, "epochs": 3, "batch_size": 5},
        ]
    )
    _, fn = plan_lr({**OPTIM, "warmup_epochs": 2}, schedule, 100, 1, 1)
    assert fn.warmup_steps == 10 + 20  # one epoch of each stage


def test_frozen_backbone_groups_get_lr_zero_then_follow_the_schedule():
    net = small_net()
    groups = decay_groups(net[:2], 0.0, tag="backbone") + decay_groups(net[2:], 0.0, tag="head")
    optimizer = build_optimizer(groups, {"name": "sgd", "weight_decay": 0.0}, lr=1.0)
    scheduler = lambda_scheduler(optimizer, WarmupCosine(total_steps=10, frozen_steps=3))
    lrs = []
    for _ in range(5):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    tags = [g["tag"] for g in optimizer.param_groups]
    for step, row in enumerate(lrs):
        for tag, lr in zip(tags, row, strict=True):
            expected = WarmupCosine(total_steps=10)(step)
            assert lr == pytest.approx(0.0 if tag == "backbone" and step < 3 else expected)


def test_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match=r"optim.name must be one of .*'adam'"):
        build_optimizer(decay_groups(small_net(), 0.0), {"name": "adam"}, 0.1)


# -- resuming with a changed config -------------------------------------------------------------
def _scheduler(stages, world: int = 1, freeze_epochs: int = 0, n_train: int = 640):
    """An SGD optimiser on ``small_net`` and its :class:`PlannedLR`, as the modules build them."""
    net = small_net()
    groups = decay_groups(net[:2], 1e-4, tag="backbone") + decay_groups(net[2:], 1e-4, tag="head")
    lr, plan = plan_lr(
        {**OPTIM, "warmup_epochs": 1},
        ResolutionSchedule(stages),
        n_train,
        world,
        1,
        freeze_epochs=freeze_epochs,
    )
    optimizer = build_optimizer(groups, {"name": "sgd", "weight_decay": 1e-4}, lr)
    return optimizer, lambda_scheduler(optimizer, plan)


def _run(optimizer, scheduler, steps: int) -> list[list[float]]:
    """The groups' lrs of ``steps`` optimiser steps (the lr each step used)."""
    lrs = []
    for _ in range(steps):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return lrs


def _checkpoint(optimizer, scheduler) -> tuple[dict, dict]:
    """Optimiser and scheduler states through a save/load round trip, as in a checkpoint."""
    buffer = io.BytesIO()
    torch.save((optimizer.state_dict(), scheduler.state_dict()), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _resume(state, stages, **kwargs):
    optimizer, scheduler = _scheduler(stages, **kwargs)
    optimizer.load_state_dict(state[0])  # Lightning's order: optimisers, then schedulers
    scheduler.load_state_dict(state[1])
    return optimizer, scheduler


def _stages(*epochs_and_batches: tuple[int, int]) -> list[dict]:
    return [{"size": 64, "epochs": e, "batch_size": b} for e, b in epochs_and_batches]


def test_resume_without_a_config_change_is_exact(caplog):
    stages = _stages((2, 32), (2, 16))
    optimizer, scheduler = _scheduler(stages, freeze_epochs=1)
    expected = _run(optimizer, scheduler, 80)  # 20 steps per epoch at batch 32, then 40
    optimizer, scheduler = _scheduler(stages, freeze_epochs=1)
    _run(optimizer, scheduler, 30)
    with caplog.at_level(logging.INFO, logger="ssl_mt.lr_plan"):
        optimizer, scheduler = _resume(_checkpoint(optimizer, scheduler), stages, freeze_epochs=1)
    assert _run(optimizer, scheduler, 50) == expected[30:]  # bit for bit
    assert "lr plan rebuilt" not in caplog.text


@pytest.mark.parametrize(
    ("old", "new", "changed"),
    [
        (_stages((2, 32)), _stages((4, 32)), "total steps 40 -> 80"),
        # A progressive stage appended: its batch size rescales the lr from its first step.
        (_stages((2, 32)), _stages((2, 32), (2, 8)), "stage lr factors [1.0] -> [1.0, 0.25]"),
    ],
)
def test_resumed_with_another_schedule_the_lr_is_the_new_plans(caplog, old, new, changed):
    optimizer, scheduler = _scheduler(new)
    steps = sum(ResolutionSchedule(new).optimizer_steps(640, 1, 1))
    expected = _run(optimizer, scheduler, steps)
    optimizer, scheduler = _scheduler(old)
    _run(optimizer, scheduler, 40)  # the old run finished
    with caplog.at_level(logging.INFO, logger="ssl_mt.lr_plan"):
        optimizer, scheduler = _resume(_checkpoint(optimizer, scheduler), new)
    assert _run(optimizer, scheduler, steps - 40) == expected[40:]
    assert "lr plan rebuilt from the config at step 40" in caplog.text
    assert changed in caplog.text


def test_resumed_on_more_devices_the_plan_continues_at_the_same_epoch(caplog):
    stages = _stages((4, 32))
    optimizer, scheduler = _scheduler(stages, world=1)  # 20 steps per epoch
    _run(optimizer, scheduler, 40)  # two epochs
    with caplog.at_level(logging.INFO, logger="ssl_mt.lr_plan"):
        optimizer, scheduler = _resume(_checkpoint(optimizer, scheduler), stages, world=2)
    # 2 processes: 10 steps per epoch, the global batch and (linear rule) the peak lr double.
    fresh_optimizer, fresh_scheduler = _scheduler(stages, world=2)
    expected = _run(fresh_optimizer, fresh_scheduler, 40)
    assert _run(optimizer, scheduler, 20) == expected[20:]  # epochs 2 and 3 of the new plan
    assert "position step 40 -> 20 of the new plan" in caplog.text
    assert "peak lr backbone 0.0375 -> 0.075" in caplog.text
    assert "total steps 80 -> 40" in caplog.text
    # Saved again and resumed with the same config: the offset carries over.
    optimizer, scheduler = _scheduler(stages, world=1)
    _run(optimizer, scheduler, 40)
    optimizer, scheduler = _resume(_checkpoint(optimizer, scheduler), stages, world=2)
    _run(optimizer, scheduler, 5)
    optimizer, scheduler = _resume(_checkpoint(optimizer, scheduler), stages, world=2)
    assert _run(optimizer, scheduler, 15) == expected[25:]


@pytest.mark.parametrize(
    ("step", "old", "new", "expected"),
    [
        (40, (0, 20, 40), (0, 20, 40, 60, 80), 40),  # same steps per epoch
        (40, (0, 20, 40, 60, 80), (0, 10, 20, 30, 40), 20),  # twice the devices
        (30, (0, 20, 40, 60, 80), (0, 10, 20, 30, 40), 15),  # half-way through epoch 1
        (50, (0, 20, 40), (0, 10, 20), 30),  # past both plans' ends
        (7, (), (0, 10), 7),  # an old checkpoint without epoch_starts
    ],
)
def test_same_progress(step, old, new, expected):
    assert same_progress(step, old, new) == expected
