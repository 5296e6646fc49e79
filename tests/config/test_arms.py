"""The arms of the reference study as experiments: random, ImageNet, SSL, SSL from ImageNet."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ssl_mt.models.backbone import create_backbone
from ssl_mt.models.multitask_net import MultiTaskNet
from tests.helpers import compose_app


def resolved(app: str, overrides: list[str]) -> dict:
    return OmegaConf.to_container(compose_app(app, overrides), resolve=True)


@pytest.mark.parametrize(
    ("app", "experiment", "pretrained"),
    [
        ("finetune", "mt", False),
        ("finetune", "mt_imagenet", True),
        ("finetune", "mt_ssl", False),
        ("pretrain", "seed_b4", False),
        ("pretrain", "seed_b4_imagenet", True),
    ],
)
def test_arms_compose(app: str, experiment: str, pretrained: bool) -> None:
    cfg = resolved(app, [f"experiment={experiment}"])
    assert cfg["experiment_name"] == experiment
    assert cfg["backbone"]["pretrained"] is pretrained
    assert cfg["backbone"]["name"] == "efficientnet_b4"


def test_imagenet_arm_differs_from_mt_only_in_the_backbone_init() -> None:
    mt = resolved("finetune", ["experiment=mt"])
    imagenet = resolved("finetune", ["experiment=mt_imagenet"])
    assert imagenet["backbone"].pop("pretrained") and not mt["backbone"].pop("pretrained")
    assert imagenet["backbone"].pop("pretrained_cfg_overlay") is None
    for cfg in (mt, imagenet):
        cfg.pop("experiment_name")
    assert mt == imagenet


def test_ssl_from_imagenet_differs_from_seed_b4_only_in_the_backbone_init() -> None:
    seed = resolved("pretrain", ["experiment=seed_b4"])
    imagenet = resolved("pretrain", ["experiment=seed_b4_imagenet"])
    assert imagenet["backbone"].pop("pretrained") and not seed["backbone"].pop("pretrained")
    imagenet["backbone"].pop("pretrained_cfg_overlay")
    for cfg in (seed, imagenet):
        cfg.pop("experiment_name")
    assert seed == imagenet


@pytest.fixture(scope="module")
def local_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A timm state dict on disk, as an offline user keeps a hub download."""
    torch.manual_seed(123)
    state = timm.create_model("test_efficientnet").state_dict()
    path = tmp_path_factory.mktemp("weights") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path, state


def test_offline_imagenet_weights_load_through_the_overlay(local_weights, default_tasks) -> None:
    """``pretrained_cfg_overlay={file: PATH}`` reaches timm in both apps: no download."""
    path, state = local_weights
    cfg = compose_app(
        "finetune",
        [
            "experiment=mt_imagenet",
            "backbone=test_efficientnet",
            "backbone.pretrained=true",
            f"+backbone.pretrained_cfg_overlay={{file:{path}}}",
        ],
    )
    backbone = OmegaConf.to_container(cfg.backbone, resolve=True)
    net = MultiTaskNet(
        backbone["name"],
        default_tasks,
        decoder_channels=backbone["decoder_channels"],
        pretrained=True,
        pretrained_cfg_overlay=backbone["pretrained_cfg_overlay"],
    )
    torch.testing.assert_close(net.timm_encoder.conv_stem.weight, state["conv_stem.weight"])
    ssl = create_backbone(
        "test_efficientnet", pretrained=True, pretrained_cfg_overlay={"file": str(path)}
    )
    torch.testing.assert_close(ssl.conv_stem.weight, state["conv_stem.weight"])
