"""Checkpoints carry every tensor: they load without the initial weights file, elsewhere,
offline; initial weights (a file or timm's hub) are loaded by the apps for new runs only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ssl_mt.finetune import build_module, run
from ssl_mt.models.multitask import MultiTaskModule
from ssl_mt.models.simclr import SimCLRModule
from tests.helpers import block_network, compose_app

OPTIM = {"name": "adamw", "base_lr": 1e-3, "lr_scaling": "none", "weight_decay": 0.0}


def _distinct_state(name: str = "test_efficientnet", offset: float = 0.5) -> dict:
    """A plain timm state dict whose every tensor differs from a fresh init."""
    gen = torch.Generator().manual_seed(7)
    state = {}
    for key, value in timm.create_model(name, num_classes=0).state_dict().items():
        if value.is_floating_point():
            state[key] = (value + offset + torch.rand(value.shape, generator=gen)).contiguous()
        else:
            state[key] = torch.full_like(value, 5)
    return state


def _cfg(root: Path, run_dir: Path, *extra: str):
    return compose_app(
        "finetune",
        [
            "experiment=quick",
            f"data.root={root}",
            f"run_dir={run_dir}",
            "++trainer.enable_progress_bar=false",
            "data.num_workers=0",
            "data.pin_memory=false",
            "schedule.stages=[{size:32,epochs:2,batch_size:8}]",
            "schedule.eval_sizes=[32]",
            "logger=[csv]",
            "~callbacks.predictions",
            "test_after_fit=false",
            "eval_records=false",
            "++trainer.limit_train_batches=2",
            "++trainer.limit_val_batches=1",
            *extra,
        ],
    )


def test_finetune_checkpoint_loads_and_resumes_without_its_weights_file(
    synthetic_root, tmp_path, monkeypatch
):
    weights = tmp_path / "init" / "backbone.safetensors"
    weights.parent.mkdir()
    save_file(_distinct_state(), str(weights))
    run_dir = tmp_path / "run"
    # Epoch 1 of 2, then the weights file disappears and the run resumes from elsewhere.
    run(_cfg(synthetic_root, run_dir, f"backbone.weights={weights}", "trainer.max_epochs=1"))
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved["epoch"] == 0
    assert saved["hyper_parameters"]["backbone"]["weights"] == str(weights)  # provenance
    weights.unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    block_network(monkeypatch)

    module = MultiTaskModule.load_from_checkpoint(ckpt, map_location="cpu")
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value, saved["state_dict"][key], rtol=0, atol=0, msg=key)

    run(_cfg(synthetic_root, run_dir, f"backbone.weights={weights}"))
    resumed = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert resumed["epoch"] == 1
    assert os.listdir(elsewhere) == []  # nothing written into the working directory


def test_pretrained_flag_goes_to_the_hub_only_when_a_run_is_built(tmp_path, monkeypatch):
    block_network(monkeypatch)
    hparams = {
        "tasks": OmegaConf.to_container(compose_app("finetune", []).tasks),
        "backbone": {"name": "test_efficientnet", "pretrained": True, "weights": None},
        "optim": OPTIM,
        "weighting": {"name": "fixed"},
        "eval_sizes": [32],
        "channels_last": False,
    }
    module = MultiTaskModule(**hparams)  # offline: the constructor loads nothing
    assert module.encoder_tensors_loaded == 0
    path = tmp_path / "pretrained.ckpt"
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": hparams,
            "pytorch-lightning_version": "2.6.6",
        },
        path,
    )
    loaded = MultiTaskModule.load_from_checkpoint(path, map_location="cpu")
    assert loaded.hparams.backbone["pretrained"] is True

    # The app's build of a new run does fetch them (here: a stand-in for the download).
    hub = _distinct_state()
    calls = []

    def fake_hub(name, **kwargs):
        calls.append(name)
        return hub

    monkeypatch.setattr("ssl_mt.models.backbone.hub_state_dict", fake_hub)
    built = build_module(compose_app("finetune", ["experiment=quick", "backbone.pretrained=true"]))
    assert calls == ["test_efficientnet"]
    assert built.encoder_tensors_loaded == len(built.net.timm_encoder.state_dict())
    encoder = built.net.encoder_state_for_timm()
    torch.testing.assert_close(encoder["conv_stem.weight"], hub["conv_stem.weight"])
    assert not build_module(
        compose_app("finetune", ["experiment=quick", "backbone.pretrained=true"]),
        init_weights=False,
    ).encoder_tensors_loaded
    assert calls == ["test_efficientnet"]


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_ssl_module_loads_offline_and_the_app_inits_the_backbone(method, tmp_path, monkeypatch):
    from ssl_mt.pretrain import build_module as build_pretrain

    block_network(monkeypatch)
    hub = _distinct_state()
    monkeypatch.setattr("ssl_mt.models.backbone.hub_state_dict", lambda name, **kw: hub)
    cfg = compose_app(
        "pretrain", ["experiment=quick", f"method={method}", "backbone.pretrained=true"]
    )
    module = build_pretrain(cfg)
    torch.testing.assert_close(
        module.backbone.state_dict()["conv_stem.weight"], hub["conv_stem.weight"]
    )
    if method == "byol":  # the EMA target starts from the same weights
        target = module.target["backbone"].state_dict()
        torch.testing.assert_close(target["conv_stem.weight"], hub["conv_stem.weight"])
    if method == "simclr":
        path = tmp_path / "ssl.ckpt"
        torch.save(
            {
                "state_dict": module.state_dict(),
                "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": "2.6.6",
            },
            path,
        )
        monkeypatch.setattr(
            "ssl_mt.models.backbone.hub_state_dict",
            lambda name, **kw: pytest.fail("a checkpoint load went to the hub"),
        )
        loaded = SimCLRModule.load_from_checkpoint(path, map_location="cpu")
        torch.testing.assert_close(
            loaded.backbone.state_dict()["conv_stem.weight"], hub["conv_stem.weight"]
        )
