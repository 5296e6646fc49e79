"""SyncBatchNorm keeps timm's fused norm + activation layers (``ssl_mt.sync_batchnorm``).

torch's ``SyncBatchNorm.convert_sync_batchnorm`` (Lightning's ``sync_batchnorm=True``)
replaces timm's ``BatchNormAct2d`` by a plain SyncBatchNorm, dropping its activation; the
controls below show that it changes the network's output, so the equality tests would catch
it. SyncBatchNorm only synchronises inside an initialised process group (and then on GPUs
only): in one CPU process it computes what BatchNorm computes, train mode included.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from lightning.pytorch.plugins import LayerSync, TorchSyncBatchNorm
from timm.layers import BatchNormAct2d, SyncBatchNormAct
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ssl_mt.models.backbone import create_backbone
from ssl_mt.models.multitask_net import MultiTaskNet
from ssl_mt.runner import build_trainer
from ssl_mt.sync_batchnorm import TimmSyncBatchNorm
from tests.helpers import compose_app

DECODER = [64, 32, 16, 16, 8]  # conf/backbone/test_efficientnet.yaml


def timm_convert(model: nn.Module) -> nn.Module:
    return TimmSyncBatchNorm().apply(model)


def torch_convert(model: nn.Module) -> nn.Module:
    return TorchSyncBatchNorm().apply(model)


def outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    out = model(x)
    if isinstance(out, dict):
        return [out[k] for k in sorted(out)]
    return [out]


def max_change(
    build: Callable[[], nn.Module], convert: Callable[[nn.Module], nn.Module], train: bool = False
) -> float:
    """Largest absolute output change the conversion makes on one batch (0: identical)."""
    torch.manual_seed(0)
    model = build().train(train)
    x = torch.randn(4, 3, 64, 64)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        torch.manual_seed(1)  # the same dropout masks in train mode
        before = outputs(model, x)
        torch.manual_seed(1)
        after = outputs(convert(twin), x)
    assert len(before) == len(after)
    return max((a - b).abs().max().item() for a, b in zip(before, after, strict=True))


def backbone(name: str = "test_efficientnet") -> nn.Module:
    return create_backbone(name)


def multitask_net(default_tasks) -> Callable[[], nn.Module]:
    return lambda: MultiTaskNet("test_efficientnet", default_tasks, decoder_channels=DECODER)


def test_timm_conversion_keeps_the_backbone_output_exactly():
    torch.manual_seed(0)
    model = backbone().eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        after = timm_convert(copy.deepcopy(model))(x)
    assert torch.equal(before, after)


def test_timm_conversion_keeps_the_multitask_net_outputs_exactly(default_tasks):
    assert max_change(multitask_net(default_tasks), timm_convert) == 0.0


def test_timm_conversion_keeps_train_mode_outputs_in_one_process(default_tasks):
    # No process group: SyncBatchNorm normalises with the local batch statistics, as BN does.
    assert max_change(backbone, timm_convert, train=True) == 0.0
    assert max_change(multitask_net(default_tasks), timm_convert, train=True) == 0.0


def test_torch_conversion_drops_the_activation(default_tasks):
    """Control: the equality tests above fail for torch's converter."""
    assert max_change(backbone, torch_convert) > 1e-2
    assert max_change(multitask_net(default_tasks), torch_convert) > 1e-2


def test_every_norm_act_layer_keeps_its_activation_and_drop():
    model = backbone()
    fused = {n: m for n, m in model.named_modules() if isinstance(m, BatchNormAct2d)}
    assert fused, "test_efficientnet has no BatchNormAct2d: the test checks nothing"
    converted = dict(timm_convert(model).named_modules())
    for name, original in fused.items():
        layer = converted[name]
        assert isinstance(layer, SyncBatchNormAct), name
        assert layer.act is original.act and layer.drop is original.drop, name
        assert layer.weight is original.weight and layer.running_mean is original.running_mean
    assert not any(
        isinstance(m, _BatchNorm) and not isinstance(m, nn.SyncBatchNorm)
        for m in converted.values()
    )


def test_revert_restores_the_original_layers_with_the_trained_state(default_tasks):
    torch.manual_seed(0)
    net = MultiTaskNet("test_efficientnet", default_tasks, decoder_channels=DECODER)
    classes = {n: type(m) for n, m in net.named_modules()}
    acts = {n: type(m.act) for n, m in net.named_modules() if isinstance(m, BatchNormAct2d)}
    assert any(act is not nn.Identity for act in acts.values())
    plugin = TimmSyncBatchNorm()
    synced = plugin.apply(net)
    synced.train()
    with torch.no_grad():
        synced(torch.randn(4, 3, 64, 64))  # the running statistics move
    state = {k: v.clone() for k, v in synced.state_dict().items()}
    reverted = plugin.revert(synced)
    assert {n: type(m) for n, m in reverted.named_modules()} == classes
    assert reverted.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in reverted.state_dict().items())
    layers = dict(reverted.named_modules())
    assert {n: type(layers[n].act) for n in acts} == acts  # activations back in place


def test_revert_of_a_bare_norm_layer():
    plugin = TimmSyncBatchNorm()
    layer = BatchNormAct2d(4, act_layer=nn.SiLU)
    synced = plugin.apply(layer)
    assert isinstance(synced, SyncBatchNormAct)
    assert plugin.revert(synced) is layer


# -- what the apps build ------------------------------------------------------------------------
# GPUs are not needed to build a DDP trainer: the CPU accelerator with the same strategy.
ON_CPU = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]


def composed_trainer(app: str, overrides: list[str], tmp_path):
    cfg = compose_app(app, [*overrides, *ON_CPU, f"run_dir={tmp_path}", "logger=[csv]"])
    assert cfg.trainer.sync_batchnorm is True
    return cfg, build_trainer(cfg)


def layer_sync_of(trainer) -> LayerSync:
    # Lightning hands the plugin to the strategy, which applies it when fitting starts.
    layer_sync = trainer.strategy._layer_sync
    assert layer_sync is trainer._accelerator_connector._layer_sync
    assert isinstance(layer_sync, TimmSyncBatchNorm), type(layer_sync)
    assert not isinstance(layer_sync, TorchSyncBatchNorm)
    return layer_sync


def assert_keeps_norm_act(layer_sync: LayerSync, module: nn.Module) -> None:
    fused = [n for n, m in module.named_modules() if isinstance(m, BatchNormAct2d)]
    assert fused
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    module.eval()
    with torch.no_grad():
        before = outputs(module, x)
        converted = layer_sync.apply(module)
        after = outputs(converted, x)
    diff = max((a - b).abs().max().item() for a, b in zip(before, after, strict=True))
    assert diff == 0.0, f"the conversion changed the output by up to {diff}"
    layers = dict(converted.named_modules())
    assert all(isinstance(layers[n], SyncBatchNormAct) for n in fused)


def test_pretrain_seed_b4_under_ddp_syncs_batchnorm_with_timm(tmp_path):
    from ssl_mt.pretrain import build_module

    cfg, trainer = composed_trainer("pretrain", ["experiment=seed_b4", "trainer=ddp"], tmp_path)
    assert cfg.backbone.name == "efficientnet_b4"
    layer_sync = layer_sync_of(trainer)
    assert_keeps_norm_act(layer_sync, build_module(cfg).backbone)


def test_finetune_under_ddp_syncs_batchnorm_with_timm(tmp_path):
    from ssl_mt.finetune import build_module

    cfg, trainer = composed_trainer(
        "finetune", ["trainer=ddp", "backbone=test_efficientnet"], tmp_path
    )
    layer_sync = layer_sync_of(trainer)
    assert_keeps_norm_act(layer_sync, build_module(cfg).net)


def test_no_layer_sync_without_sync_batchnorm(tmp_path):
    cfg = compose_app("finetune", ["trainer=ddp_cpu", f"run_dir={tmp_path}", "logger=[csv]"])
    assert cfg.trainer.sync_batchnorm is False
    assert build_trainer(cfg).strategy._layer_sync is None


# -- MoCo: Shuffling BN and SyncBatchNorm exclude each other -------------------------------------
MOCO = ["method=moco", "trainer=ddp", "backbone=test_efficientnet", "method.queue_size=4096"]


def moco_under_ddp(tmp_path, *overrides: str):
    from ssl_mt.pretrain import build_module

    cfg = compose_app(
        "pretrain", [*MOCO, *overrides, *ON_CPU, f"run_dir={tmp_path}", "logger=[csv]"]
    )
    trainer = build_trainer(cfg)
    module = build_module(cfg)
    layer_sync = trainer.strategy._layer_sync
    # What the DDP strategy does before on_fit_start.
    return module if layer_sync is None else layer_sync.apply(module)


def test_moco_refuses_shuffle_bn_under_sync_batchnorm(tmp_path):
    module = moco_under_ddp(tmp_path)
    assert module.shuffle_bn
    with pytest.raises(ValueError, match=r"method\.shuffle_bn=true with SyncBatchNorm") as error:
        module.on_fit_start()
    assert "trainer.sync_batchnorm=false" in str(error.value)
    assert "method.shuffle_bn=false" in str(error.value)


@pytest.mark.parametrize("choice", ["method.shuffle_bn=false", "trainer.sync_batchnorm=false"])
def test_moco_under_ddp_with_either_choice_starts(tmp_path, choice):
    module = moco_under_ddp(tmp_path, choice)
    synced = any(isinstance(m, nn.SyncBatchNorm) for m in module.target.modules())
    assert synced == (choice == "method.shuffle_bn=false")
    module.on_fit_start()
