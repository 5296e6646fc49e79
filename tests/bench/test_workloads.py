"""The bench's workloads are the apps' own: same config, same modules, an honest U-Net."""

from __future__ import annotations

import torch

from ssl_mt.bench import BenchSettings
from ssl_mt.bench.instruments import PeakMemory
from ssl_mt.bench.workloads import app_config, build_multitask, build_unet


def settings(**overrides) -> BenchSettings:
    return BenchSettings(
        backbone="test_efficientnet", sizes=[64], batch_sizes=[2], device="cpu", **overrides
    ).resolved()


def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_unet_row_has_the_multitask_encoder_decoder_and_outputs() -> None:
    s = settings()
    device, memory = torch.device("cpu"), PeakMemory(torch.device("cpu"))
    unet = build_unet(s, device, memory, 64, 2).module
    mt = build_multitask(s, device, memory, 64, 2).module.net
    assert shapes(unet.encoder) == shapes(mt.encoder)
    assert shapes(unet.decoder) == shapes(mt.decoder)
    assert shapes(unet.segmentation_head) == shapes(mt.segmentation_head)
    out = unet(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 2, 64, 64)  # skin and scalp


def test_workloads_compose_the_apps_config() -> None:
    cfg = app_config("finetune", settings(optim="sgd"), 96, 8, {"data.reduced_decoding": False})
    assert cfg.backbone.name == "test_efficientnet"
    assert cfg.optim.name == "sgd"
    assert [dict(s) for s in cfg.schedule.stages] == [{"size": 96, "epochs": 1, "batch_size": 8}]
    assert cfg.data.reduced_decoding is False
    assert cfg.model.decoder_channels == cfg.backbone.decoder_channels
    again = app_config("finetune", settings(optim="sgd"), 64, 2)  # a copy, not the one changed
    assert again.data.reduced_decoding is True and again.schedule.stages[0].size == 64
    pre = app_config("pretrain", settings(ssl_augment="simclr"), 64, 4)
    assert pre.augment.name == "simclr" and pre.method._target_.endswith("SimCLRModule")
