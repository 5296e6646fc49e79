"""A NaN loss in the middle of a real run: ``raise`` stops it cleanly, ``skip`` goes on.

The loss is poisoned by monkeypatching the module's loss function for chosen training
batches; the runs are the apps' ``run(cfg)`` on the quick profile (32 px, 5 steps/epoch).
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest
import torch
from reliability_helpers import per_epoch, read_metrics, run_app, tiny_cfg

from ssl_mt.models.multitask import MultiTaskModule
from ssl_mt.models.nonfinite import NonFiniteGuard, NonFiniteLossError
from ssl_mt.models.simclr import SimCLRModule

STAGES = "schedule.stages=[{size:32,epochs:3,batch_size:8}]"  # 41 images: 5 steps per epoch
POISONED_TASK = {"finetune": "scalp", "pretrain": "loss"}


def _poison(monkeypatch, app: str, batches: Iterable[int]) -> None:
    """Makes the training loss NaN at the given training batches (counted over the run)."""
    bad, calls = set(batches), {"n": 0}

    def poisoned(losses: dict, training: bool) -> dict:
        if training:
            if calls["n"] in bad:
                losses = dict(losses)
                name = POISONED_TASK[app]
                losses[name] = losses[name] * float("nan")
            calls["n"] += 1
        return losses

    if app == "finetune":
        original = MultiTaskModule.per_sample_losses

        def per_sample_losses(self, outputs, batch):
            return poisoned(original(self, outputs, batch), self.training)

        monkeypatch.setattr(MultiTaskModule, "per_sample_losses", per_sample_losses)
    else:
        original_step = SimCLRModule.ssl_step

        def ssl_step(self, views):
            loss, z, extra = original_step(self, views)
            return poisoned({"loss": loss}, self.training)["loss"], z, extra

        monkeypatch.setattr(SimCLRModule, "ssl_step", ssl_step)


def _finite(state: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


@pytest.mark.slow
@pytest.mark.parametrize("app", ["finetune", "pretrain"])
def test_raise_stops_at_the_bad_step_and_keeps_the_last_good_checkpoint(
    synthetic_root, tmp_path, monkeypatch, app
):
    _poison(monkeypatch, app, [7])  # epoch 1, after epoch 0's checkpoint (step 5)
    cfg = tiny_cfg(app, synthetic_root, tmp_path, STAGES, "nonfinite.policy=raise")
    with pytest.raises(NonFiniteLossError) as info:
        run_app(app, cfg)
    message = str(info.value)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert "training step 7" in message
    assert f"task {POISONED_TASK[app]!r}" in message
    assert str(last) in message
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["global_step"] == 5 < 7
    assert state["epoch"] == 0
    assert _finite(state["state_dict"])
    # Nothing was logged for the epoch that died.
    assert set(
        per_epoch(
            read_metrics(tmp_path), "val/32/global/loss" if app == "finetune" else "knn/tone/top1"
        )
    ) == {0}


@pytest.mark.slow
@pytest.mark.parametrize("app", ["finetune", "pretrain"])
def test_skip_drops_the_bad_batches_counts_them_and_finishes(
    synthetic_root, tmp_path, monkeypatch, app
):
    _poison(monkeypatch, app, [3, 7, 8])  # epochs 0 and 1 (batches 3 | 2, 3)
    cfg = tiny_cfg(app, synthetic_root, tmp_path, STAGES, "nonfinite.policy=skip")
    run_app(app, cfg)
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["epoch"] == 2
    assert int(state["state_dict"]["nonfinite.skipped"]) == 3
    assert _finite(state["state_dict"])
    df = read_metrics(tmp_path)
    assert "train/nonfinite_skipped" in df.columns, "the skipped batches never reached the log"
    counts = df["train/nonfinite_skipped"].dropna()
    assert counts.max() == 3
    loss = "train/global/loss" if app == "finetune" else "train/loss"
    losses = per_epoch(df, loss)
    assert set(losses) == {0, 1, 2}
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())


def test_check_every_n_steps_names_the_first_bad_step_and_task():
    guard = NonFiniteGuard(policy="raise", check_every_n_steps=4)
    ok = torch.tensor(1.0)
    assert not guard.should_skip({"a": ok, "b": ok}, 0)
    assert not guard.should_skip({"a": ok, "b": torch.tensor(float("nan"))}, 1)  # first
    assert not guard.should_skip({"a": torch.tensor(float("inf")), "b": ok}, 2)  # second
    with pytest.raises(NonFiniteLossError, match=r"training step 1 in task 'b'"):
        guard.should_skip({"a": ok, "b": ok}, 3)  # the check, 2 steps after


def test_skip_policy_counts_and_rejects_a_deferred_check():
    guard = NonFiniteGuard(policy="skip")
    assert guard.should_skip({"a": torch.tensor(float("nan"))}, 0)
    assert not guard.should_skip({"a": torch.tensor(1.0)}, 1)
    assert guard.should_skip({"a": torch.tensor([1.0, float("inf")])}, 2)
    assert int(guard.skipped) == 2
    with pytest.raises(ValueError, match="check_every_n_steps must be 1"):
        NonFiniteGuard(policy="skip", check_every_n_steps=2)
