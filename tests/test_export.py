"""``python -m ssl_mt.export CKPT --out DIR [--onnx]``: pretraining and fine-tuning checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from safetensors.torch import load_file

from ssl_mt.config import load_tasks_config
from ssl_mt.export import ExportError, export_checkpoint, main
from ssl_mt.models.backbone import BackboneError
from ssl_mt.models.multitask import MultiTaskModule
from ssl_mt.models.multitask_net import MultiTaskNet, timm_key
from ssl_mt.models.simclr import SimCLRModule
from ssl_mt.safe_loading import UnsafeCheckpointError

ROOT = Path(__file__).resolve().parents[1]
OPTIM = {"name": "adamw", "base_lr": 1e-3, "lr_scaling": "none", "weight_decay": 0.0}


def perturb(module: torch.nn.Module) -> None:
    """Moves every tensor away from any fresh initialisation."""
    torch.manual_seed(0)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) + 1.0)
            else:
                tensor.add_(3)


def save_checkpoint(module: L.LightningModule, path: Path) -> Path:
    """A real Lightning checkpoint (hyper-parameters included), without training."""
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(path.parent),
    )
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def simclr_module() -> SimCLRModule:
    module = SimCLRModule(
        projection={"hidden_dim": 16, "out_dim": 8},
        temperature=0.2,
        backbone={"name": "test_efficientnet", "pretrained": False, "weights": None},
        optim=OPTIM,
        channels_last=False,
        image_size=96,
    )
    perturb(module)
    return module


@pytest.fixture(scope="module")
def pretrain_ckpt(simclr_module, tmp_path_factory) -> Path:
    return save_checkpoint(simclr_module, tmp_path_factory.mktemp("pre") / "last.ckpt")


@pytest.fixture(scope="module")
def finetune_module() -> MultiTaskModule:
    # test_convnext: its features_only encoder flattens names (stages_0), unlike EfficientNet.
    module = MultiTaskModule(
        tasks=load_tasks_config("default"),
        backbone={"name": "test_convnext", "pretrained": False, "weights": None},
        optim=OPTIM,
        weighting={"name": "fixed"},
        eval_sizes=[64, 96],
        decoder_channels=[16, 16, 8, 8, 8],
        channels_last=False,
    )
    perturb(module)
    return module


@pytest.fixture(scope="module")
def finetune_ckpt(finetune_module, tmp_path_factory) -> Path:
    return save_checkpoint(finetune_module, tmp_path_factory.mktemp("ft") / "last.ckpt")


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


# -- pretraining checkpoints --------------------------------------------------------------------
def test_pretrain_checkpoint_exports_the_backbone(pretrain_ckpt, simclr_module, tmp_path):
    out = tmp_path / "b"
    assert main([str(pretrain_ckpt), "--out", str(out)]) == 0
    assert_same(load_file(str(out / "model.safetensors")), simclr_module.backbone.state_dict())
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "test_efficientnet"
    assert config["ssl_mt"]["source"] == "pretrain"
    assert config["pretrained_cfg"]["input_size"] == [3, 96, 96]
    assert config["ssl_mt"]["source_checkpoint"] == str(pretrain_ckpt)
    # ...and plain timm takes the folder back whole.
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert_same(model.state_dict(), load_file(str(out / "model.safetensors")))


def test_checkpoint_with_omegaconf_hyper_parameters(simclr_module, tmp_path):
    """Older runs saved OmegaConf objects in hyper_parameters: they need full unpickling,
    which only ``--trust-checkpoint`` allows."""
    from omegaconf import OmegaConf

    state = {f"backbone.{k}": v for k, v in simclr_module.backbone.state_dict().items()}
    hparams = {"backbone": OmegaConf.create({"name": "test_efficientnet"}), "image_size": 64}
    path = tmp_path / "omegaconf.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": hparams}, path)
    with pytest.raises(
        UnsafeCheckpointError, match=r"omegaconf\.ckpt: refused.*--trust-checkpoint"
    ):
        export_checkpoint(path, tmp_path / "b")
    assert main([str(path), "--out", str(tmp_path / "b"), "--trust-checkpoint"]) == 0
    out = tmp_path / "b"
    assert_same(load_file(str(out / "model.safetensors")), simclr_module.backbone.state_dict())


@pytest.mark.slow
def test_command_line(pretrain_ckpt, simclr_module, tmp_path):
    out = tmp_path / "cli" / "backbone"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "ssl_mt.export", str(pretrain_ckpt), "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert_same(load_file(str(out / "model.safetensors")), simclr_module.backbone.state_dict())
    assert (out / "config.json").is_file()


# -- fine-tuning checkpoints ----------------------------------------------------------------------
def test_finetune_checkpoint_exports_the_encoder_in_timm_names(
    finetune_ckpt, finetune_module, tmp_path
):
    out = export_checkpoint(finetune_ckpt, tmp_path / "ft") / "encoder.safetensors"
    state = load_file(str(out))
    assert_same(state, finetune_module.net.encoder_state_for_timm())
    timm_state = timm.create_model("test_convnext", num_classes=0).state_dict()
    assert any(k.startswith("stages.0.") for k in state)  # renamed from stages_0
    assert set(state) <= set(timm_state)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["source"] == "finetune" and meta["model_name"] == "test_convnext"
    assert meta["image_size"] == 96
    assert sorted(meta["not_in_file"]) == sorted(set(timm_state) - set(state))

    # Loads into timm (the tensors after the last feature map stay as they are)...
    model = timm.create_model("test_convnext", num_classes=0)
    result = model.load_state_dict(state, strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == sorted(meta["not_in_file"])
    # ...into an smp encoder (features_only names), no key missing...
    encoder = smp.Unet("tu-test_convnext", encoder_weights=None).encoder.model
    encoder.load_state_dict({k: state[timm_key(k)] for k in encoder.state_dict()}, strict=True)
    # ...and into a fresh fine-tuning network, every encoder tensor matched.
    net = MultiTaskNet("test_convnext", finetune_module.tasks, decoder_channels=[16, 16, 8, 8, 8])
    loaded, unused = net.load_encoder_weights(out)
    assert loaded == len(net.timm_encoder.state_dict()) and unused == []
    assert_same(net.encoder_state_for_timm(), state)


# -- bad input -------------------------------------------------------------------------------------
def test_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(ExportError, match=r"notes\.ckpt is not a Lightning checkpoint"):
        export_checkpoint(text, tmp_path / "out")
    plain = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), plain)
    with pytest.raises(ExportError, match=r"tensor\.pt is not a Lightning checkpoint"):
        export_checkpoint(plain, tmp_path / "out")
    assert main([str(text), "--out", str(tmp_path / "out")]) == 2
    assert "error: " in capsys.readouterr().err  # a message, exit status 2, no traceback
    assert not (tmp_path / "out").exists()


def test_a_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found: .*nope\.ckpt"):
        export_checkpoint(tmp_path / "nope.ckpt", tmp_path / "out")


def test_a_checkpoint_without_backbone(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"model.fc.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(
        ExportError, match=r"no backbone tensors .*'backbone\.'.*'net\.encoder\.model\.'"
    ):
        export_checkpoint(path, tmp_path / "out")


def test_a_checkpoint_without_the_model_name(simclr_module, tmp_path):
    path = tmp_path / "no_hparams.ckpt"
    state = {f"backbone.{k}": v for k, v in simclr_module.backbone.state_dict().items()}
    torch.save({"state_dict": state}, path)
    with pytest.raises(ExportError, match=r"no backbone\.name"):
        export_checkpoint(path, tmp_path / "out")


def test_tensors_that_do_not_fit_the_named_model(simclr_module, tmp_path):
    path = tmp_path / "wrong_name.ckpt"
    state = {f"backbone.{k}": v for k, v in simclr_module.backbone.state_dict().items()}
    torch.save(
        {"state_dict": state, "hyper_parameters": {"backbone": {"name": "test_resnet"}}}, path
    )
    with pytest.raises(BackboneError, match=r"does not fit the model:\n.*missing key\(s\)"):
        export_checkpoint(path, tmp_path / "out")


def test_output_is_a_folder(pretrain_ckpt, tmp_path):
    for name in ("backbone.safetensors", "backbone.pt"):
        with pytest.raises(ExportError, match=r"--out is a folder"):
            export_checkpoint(pretrain_ckpt, tmp_path / name)


def test_onnx_of_a_pretraining_checkpoint_is_refused(pretrain_ckpt, tmp_path):
    with pytest.raises(ExportError, match=r"pretraining checkpoint: --onnx"):
        export_checkpoint(pretrain_ckpt, tmp_path / "out", onnx=True)


# -- the multi-task model as ONNX ------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_onnx_export_matches_pytorch_under_onnxruntime(tmp_path):
    import onnx
    import onnxruntime

    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    module = MultiTaskModule(
        tasks=load_tasks_config("default"),
        backbone={"name": "test_efficientnet", "pretrained": False, "weights": None},
        optim=OPTIM,
        weighting={"name": "fixed"},
        eval_sizes=[64],
        decoder_channels=[16, 16, 8, 8, 8],
        channels_last=False,
        preprocess={"mean": mean, "std": std},
    )
    ckpt = save_checkpoint(module, tmp_path / "run" / "last.ckpt")
    out = tmp_path / "export"
    assert main([str(ckpt), "--out", str(out), "--onnx"]) == 0
    names = ["encoder.json", "encoder.safetensors", "model.json", "model.onnx"]
    assert sorted(p.name for p in out.iterdir()) == names
    description = json.loads((out / "model.json").read_text())
    assert description["input"]["mean"] == mean and description["input"]["std"] == std
    assert description["outputs"]["tone"]["classes"][0] == "monk_01"
    props = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert json.loads(props["ssl_mt"]) == description

    session = onnxruntime.InferenceSession(
        str(out / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    assert [o.name for o in session.get_outputs()] == [t.name for t in module.tasks]
    module.eval()
    torch.manual_seed(0)
    for shape in [(2, 3, 64, 64), (3, 3, 96, 128)]:  # batch and size are dynamic
        images = torch.randn(shape)
        with torch.no_grad():
            expected = module(images)
        got = session.run(None, {"image": images.numpy()})
        for task, value in zip(module.tasks, got, strict=True):
            reference = expected[task.name]
            reference = reference.sigmoid() if task.is_segmentation else reference.softmax(1)
            assert value.shape == tuple(reference.shape), task.name
            np.testing.assert_allclose(value, reference.numpy(), atol=1e-5, err_msg=task.name)
