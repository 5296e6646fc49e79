"""Paths meant for GPUs, pinned on the CPU where they can be.

- An all-bad batch under SyncBatchNorm: torch's empty-input path sends zero statistics in
  the INPUT's dtype (bfloat16 under ``bf16-mixed``) while a non-empty rank sends float32
  ``batch_norm_stats``; :func:`ssl_mt.sync_batchnorm.empty_batch_statistics` hands the layer
  a float32 empty input. The cross-rank statistics themselves need CUDA kernels: here the
  layer is checked to receive float32 and to give back the dtype it was given.
- ``compile=true`` with ``trainer.sync_batchnorm=true`` is refused before anything runs.
- ``channels_last=true``: the converted networks give the outputs of the originals.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from timm.layers import BatchNormAct2d, SyncBatchNormAct
from torch import nn

from ssl_mt.config import load_tasks_config
from ssl_mt.models.multitask import MultiTaskModule
from ssl_mt.models.ssl_base import SSLModule
from ssl_mt.runner import check_untested_combinations
from ssl_mt.schedule import ResolutionSchedule
from ssl_mt.sync_batchnorm import TimmSyncBatchNorm, empty_batch_statistics
from tests.helpers import compose_app

SIZE = 32
DECODER = [64, 32, 16, 16, 8]


def multitask(channels_last: bool = False) -> MultiTaskModule:
    torch.manual_seed(0)
    return MultiTaskModule(
        tasks=load_tasks_config("default"),
        backbone={"name": "test_efficientnet", "pretrained": False, "weights": None},
        optim={"name": "adamw", "base_lr": 1e-3, "weight_decay": 0.0},
        weighting={"name": "fixed"},
        eval_sizes=[SIZE],
        decoder_channels=DECODER,
        channels_last=channels_last,
    )


def record_inputs(model: nn.Module) -> list[torch.dtype]:
    """The dtype of every input a SyncBatchNorm layer's forward received (a forward hook is
    given the arguments as the pre-hooks left them)."""
    seen: list[torch.dtype] = []
    for module in model.modules():
        if isinstance(module, nn.SyncBatchNorm):
            module.register_forward_hook(lambda _, args, out: seen.append(args[0].dtype))
    return seen


# -- SyncBatchNorm on an empty batch ---------------------------------------------------------
def test_an_empty_bf16_input_reaches_sync_batchnorm_in_float32():
    layer = TimmSyncBatchNorm().apply(BatchNormAct2d(4, act_layer=nn.SiLU)).train()
    assert isinstance(layer, SyncBatchNormAct)
    with empty_batch_statistics(layer):
        seen = record_inputs(layer)
        out = layer(torch.zeros(0, 4, 8, 8, dtype=torch.bfloat16))
        assert seen == [torch.float32]
        assert out.dtype == torch.bfloat16 and out.shape == (0, 4, 8, 8)
        full = layer(torch.randn(2, 4, 8, 8).bfloat16())  # a non-empty input: untouched
        assert seen == [torch.float32, torch.bfloat16] and full.dtype == torch.bfloat16
        layer(torch.zeros(0, 4, 8, 8))  # float32 already: untouched
        assert seen[-1] == torch.float32
    # After the block the layer gets what it is given again.
    layer(torch.zeros(0, 4, 8, 8, dtype=torch.bfloat16))
    assert seen[-1] == torch.bfloat16


def test_the_all_bad_training_step_under_sync_batchnorm_and_bf16_autocast():
    """One process (no statistics to sync): the step runs, every layer's empty input is
    float32 at SyncBatchNorm, and the step contributes a zero loss."""
    module = multitask()
    module.net = TimmSyncBatchNorm().apply(module.net)
    module._trainer = SimpleNamespace(
        datamodule=SimpleNamespace(
            schedule=ResolutionSchedule([{"size": SIZE, "epochs": 1, "batch_size": 4}])
        ),
        accumulate_grad_batches=1,
        global_step=0,
        current_epoch=0,
    )
    module.log = lambda *_, **__: None
    module.train()
    assert any(isinstance(m, nn.SyncBatchNorm) for m in module.modules())
    seen = record_inputs(module.net)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        step = module.training_loss({"bad_samples": ["x.jpg: broken"]}, 0)
    assert seen and set(seen) == {torch.float32}, set(seen)
    assert step is not None and float(step.total.detach()) == 0.0 and step.batch_size == 0
    step.total.backward()  # the backward of the empty batch runs too


# -- compile with SyncBatchNorm --------------------------------------------------------------
@pytest.mark.parametrize("app", ["pretrain", "finetune"])
def test_compile_with_sync_batchnorm_is_refused_naming_both_keys(app):
    cfg = compose_app(app, ["trainer=ddp", "compile=true"])
    with pytest.raises(ValueError) as info:
        check_untested_combinations(cfg)
    message = str(info.value)
    for part in ("compile=true", "trainer.sync_batchnorm=true", "#107372", "#161302"):
        assert part in message, message
    check_untested_combinations(compose_app(app, ["trainer=ddp", "compile=false"]))
    check_untested_combinations(compose_app(app, ["trainer=ddp_cpu", "compile=true"]))


def test_ddp_trainers_wait_ten_minutes_for_a_collective():
    from datetime import timedelta

    from hydra.utils import instantiate

    for trainer in ("ddp", "ddp_cpu"):
        strategy = instantiate(compose_app("finetune", [f"trainer={trainer}"]).trainer.strategy)
        assert strategy._timeout == timedelta(minutes=10), trainer


# -- channels_last -----------------------------------------------------------------------------
def test_channels_last_multitask_net_gives_the_original_outputs():
    x = torch.randn(2, 3, SIZE, SIZE)
    original, converted = multitask(False).eval(), multitask(True).eval()
    converted.configure_model()
    conv = next(m for m in converted.net.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        before, after = original(x), converted(x)
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, rtol=1e-4, atol=1e-5, msg=name)


class Features(SSLModule):
    def ssl_step(self, views):
        raise NotImplementedError


def test_channels_last_backbone_gives_the_original_features():
    def build(channels_last: bool) -> SSLModule:
        torch.manual_seed(0)
        module = Features(
            backbone={"name": "test_efficientnet"},
            optim={"name": "adamw", "base_lr": 1e-3, "weight_decay": 0.0},
            channels_last=channels_last,
        )
        module.configure_model()
        return module.eval()

    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(
            build(True).features(x), build(False).features(x), rtol=1e-4, atol=1e-5
        )
