"""Loading never unpickles code: a crafted checkpoint is refused at every entry point (predict,
export, export --onnx, probe, resume, Lightning's own restore, the evaluation records), with
one line naming the file and the opt-in; project checkpoints and trusted old files load."""

from __future__ import annotations

import argparse
import logging
import pathlib
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import timm
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from omegaconf import OmegaConf

from ssl_mt import export, predict, probe
from ssl_mt.checkpointing import AtomicCheckpointIO, is_loadable
from ssl_mt.config import load_tasks_config
from ssl_mt.evaluation.evaluate import write_eval_records
from ssl_mt.finetune import run as finetune_run
from ssl_mt.models.multitask import MultiTaskModule
from ssl_mt.runner import prepare_resume, resolve_ckpt_path
from ssl_mt.safe_loading import (
    CLI_OPT_IN,
    HYDRA_OPT_IN,
    UnsafeCheckpointError,
    load_checkpoint_file,
)
from tests.helpers import compose_app

OPTIM = {"name": "adamw", "base_lr": 1e-3, "lr_scaling": "none", "weight_decay": 0.0}


class Payload:
    """Unpickled, creates ``marker``: the stand-in for any code a crafted file runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def lightning_like(payload: object | None = None) -> dict:
    """A dict shaped like a fine-tuning checkpoint, with ``payload`` in its hyper-parameters."""
    hparams = {
        "tasks": OmegaConf.to_container(load_tasks_config("default")),
        "backbone": {"name": "test_efficientnet", "pretrained": False, "weights": None},
        "preprocess": {"mean": [0.5] * 3, "std": [0.25] * 3, "size": 32},
    }
    if payload is not None:
        hparams["note"] = payload
    return {
        "epoch": 0,
        "global_step": 2,
        "pytorch-lightning_version": L.__version__,
        "state_dict": {"net.encoder.model.conv_stem.weight": torch.zeros(8, 3, 3, 3)},
        "hyper_parameters": hparams,
    }


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "payload-ran"


@pytest.fixture
def hostile(tmp_path: Path, marker: Path) -> Path:
    path = tmp_path / "crafted" / "last.ckpt"
    path.parent.mkdir()
    torch.save(lightning_like(Payload(marker)), path)
    return path


def assert_refused(message: str, path: Path, opt_in: str, marker: Path) -> None:
    assert not marker.exists(), "the crafted file's code ran"
    assert str(path) in message and "code objects" in message and opt_in in message
    assert "\n" not in message.strip()


def test_the_crafted_file_does_run_code_when_fully_unpickled(hostile, marker):
    """The control: without the guard, loading it runs its payload."""
    torch.load(hostile, weights_only=False)
    assert marker.exists()


def test_the_loader_refuses_the_crafted_file_and_names_what_it_imports(hostile, marker):
    with pytest.raises(UnsafeCheckpointError) as refused:
        load_checkpoint_file(hostile, opt_in=CLI_OPT_IN)
    assert_refused(str(refused.value), hostile, CLI_OPT_IN, marker)
    assert "pathlib" in str(refused.value)


def test_a_legacy_format_file_is_refused_too(tmp_path, marker):
    path = tmp_path / "legacy.ckpt"
    torch.save(lightning_like(Payload(marker)), path, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError) as refused:
        load_checkpoint_file(path, opt_in=HYDRA_OPT_IN)
    assert_refused(str(refused.value), path, HYDRA_OPT_IN, marker)


# -- command lines -----------------------------------------------------------------------------
def test_predict_refuses(hostile, marker, tmp_path, capsys):
    assert predict.main([str(hostile), str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert_refused(capsys.readouterr().err, hostile, CLI_OPT_IN, marker)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("onnx", [False, True], ids=["encoder", "onnx"])
def test_export_refuses(hostile, marker, tmp_path, capsys, onnx):
    args = [str(hostile), "--out", str(tmp_path / "out"), *(["--onnx"] if onnx else [])]
    assert export.main(args) == 2
    assert_refused(capsys.readouterr().err, hostile, CLI_OPT_IN, marker)
    assert not (tmp_path / "out").exists()


def test_probe_refuses_a_crafted_weights_file(tmp_path, marker, capsys):
    weights = tmp_path / "imagenet.pth"
    torch.save({"model": {}, "args": Payload(marker)}, weights)
    backbone = f"imagenet:test_efficientnet={weights}"
    args = [backbone, "--data", str(tmp_path), "--out", str(tmp_path / "out")]
    assert probe.main(args) == 2
    assert_refused(capsys.readouterr().err, weights, CLI_OPT_IN, marker)


def test_probe_reads_torch_weights_files_as_timm_does(tmp_path):
    """A timm training checkpoint (arguments in an ``argparse.Namespace``) loads untrusted."""
    source = timm.create_model("test_efficientnet", num_classes=0)
    with torch.no_grad():
        source.conv_stem.weight.add_(1.0)
    weights = tmp_path / "imagenet.pth"
    state = {f"module.{k}": v for k, v in source.state_dict().items()}  # a DDP wrapper's names
    torch.save({"model": state, "args": argparse.Namespace(lr=0.1)}, weights)
    model = probe.parse_backbone(f"imagenet:test_efficientnet={weights}").build()
    torch.testing.assert_close(model.conv_stem.weight, source.conv_stem.weight)


def test_probe_loads_an_old_style_weights_file_with_the_opt_in_only(tmp_path):
    source = timm.create_model("test_efficientnet", num_classes=0)
    weights = tmp_path / "old.pth"
    torch.save({"state_dict": source.state_dict(), "cfg": OmegaConf.create({"a": 1})}, weights)
    backbone = f"imagenet:test_efficientnet={weights}"
    with pytest.raises(UnsafeCheckpointError, match=CLI_OPT_IN):
        probe.parse_backbone(backbone)
    model = probe.parse_backbone(backbone, trust=True).build()
    torch.testing.assert_close(model.conv_stem.weight, source.conv_stem.weight)


# -- the Hydra apps: resume and evaluation records -----------------------------------------------
def finetune_cfg(run_dir: Path, *extra: str):
    return compose_app("finetune", ["experiment=quick", f"run_dir={run_dir}", *extra])


@pytest.mark.parametrize("name", ["checkpoints/last.ckpt", "hpc_ckpt_3.ckpt"])
def test_a_resume_from_a_run_folder_holding_it_is_refused(hostile, marker, tmp_path, name):
    run_dir = tmp_path / "run"
    target = run_dir / name
    target.parent.mkdir(parents=True)
    hostile.replace(target)
    with pytest.raises(UnsafeCheckpointError) as refused:
        finetune_run(finetune_cfg(run_dir, "ckpt_path=auto"))
    assert_refused(str(refused.value), target, HYDRA_OPT_IN, marker)


def test_ckpt_path_last_and_path_refuse_it_too(hostile, marker, tmp_path):
    experiment = hostile.parent.parent
    (experiment / "crafted" / "checkpoints").mkdir()
    last = hostile.replace(experiment / "crafted" / "checkpoints" / "last.ckpt")
    for value in ["last", str(last)]:
        with pytest.raises(UnsafeCheckpointError) as refused:
            resolve_ckpt_path(finetune_cfg(experiment / "new", f"ckpt_path={value}"))
        assert_refused(str(refused.value), last, HYDRA_OPT_IN, marker)
    with pytest.raises(UnsafeCheckpointError):  # not "unloadable", which would be skipped
        is_loadable(last)


def test_lightning_restore_refuses_it_even_when_torch_is_told_to_unpickle(
    hostile, marker, tmp_path, monkeypatch
):
    """``trainer.fit(ckpt_path=...)`` goes through the apps' CheckpointIO: weights-only even
    when Lightning leaves ``weights_only`` unset and the environment forces full loads."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(tmp_path),
    )
    model = BoringModel()
    with pytest.raises(UnsafeCheckpointError) as refused:
        trainer.fit(model, ckpt_path=str(hostile))
    assert_refused(str(refused.value), hostile, HYDRA_OPT_IN, marker)
    with pytest.raises(UnsafeCheckpointError):
        AtomicCheckpointIO().load_checkpoint(hostile, weights_only=True)


def test_the_evaluation_record_writer_refuses_it(hostile, marker, tmp_path):
    callback = SimpleNamespace(best_model_path=str(hostile), last_model_path="")
    trainer = SimpleNamespace(
        global_rank=0,
        checkpoint_callback=callback,
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
    )
    datamodule = SimpleNamespace(
        samples={"val": []}, eval_sizes=[], eval_loaders=lambda split, sharded: []
    )
    module = torch.nn.Linear(1, 1)
    with pytest.raises(UnsafeCheckpointError) as refused:
        write_eval_records(trainer, module, datamodule, tmp_path / "run")
    assert_refused(str(refused.value), hostile, HYDRA_OPT_IN, marker)


# -- what still loads --------------------------------------------------------------------------
def old_style(path: Path) -> Path:
    """A checkpoint as older versions wrote it: OmegaConf objects in the hyper-parameters."""
    ckpt = lightning_like()
    ckpt["hyper_parameters"] = OmegaConf.create(ckpt["hyper_parameters"])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def test_an_old_style_file_needs_the_opt_in_and_loads_with_it(tmp_path, caplog):
    path = old_style(tmp_path / "old.ckpt")
    with pytest.raises(UnsafeCheckpointError, match="omegaconf"):
        load_checkpoint_file(path)
    with caplog.at_level(logging.WARNING, logger="ssl_mt.safe_loading"):
        ckpt = load_checkpoint_file(path, trust=True, opt_in=CLI_OPT_IN)
    assert ckpt["hyper_parameters"]["backbone"]["name"] == "test_efficientnet"
    assert str(path) in caplog.text and CLI_OPT_IN in caplog.text


def test_trust_checkpoint_resumes_an_old_style_run(tmp_path):
    run_dir = tmp_path / "run"
    last = old_style(run_dir / "checkpoints" / "last.ckpt")
    with pytest.raises(UnsafeCheckpointError, match=HYDRA_OPT_IN):
        resolve_ckpt_path(finetune_cfg(run_dir))
    cfg = finetune_cfg(run_dir, "trust_checkpoint=true")
    assert resolve_ckpt_path(cfg) == str(last)
    prepare_resume(cfg, str(last))  # reads epoch and step from it
    assert compose_app("finetune", []).trust_checkpoint is False  # never on by default
    assert compose_app("pretrain", []).trust_checkpoint is False


def test_onnx_builds_the_model_from_the_checkpoint_read_weights_only(tmp_path, monkeypatch):
    """No second, unguarded load (``load_from_checkpoint``) for ``--onnx``."""
    module = MultiTaskModule(
        tasks=load_tasks_config("default"),
        backbone={"name": "test_efficientnet", "pretrained": False, "weights": None},
        optim=OPTIM,
        weighting={"name": "fixed"},
        eval_sizes=[32],
        decoder_channels=[16, 16, 8, 8, 8],
        channels_last=False,
        preprocess={"mean": [0.5] * 3, "std": [0.25] * 3, "size": 32},
    )
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    trainer.strategy.connect(module)
    path = tmp_path / "ft.ckpt"
    trainer.save_checkpoint(path)
    # Built from OmegaConf tasks, the module still writes plain containers only.
    torch.load(path, weights_only=True)
    exported = []
    monkeypatch.setattr(
        "ssl_mt.models.onnx_export.export_onnx", lambda m, out, **kw: exported.append(m)
    )
    monkeypatch.setattr(
        MultiTaskModule,
        "load_from_checkpoint",
        lambda *a, **kw: pytest.fail("a second load of the checkpoint"),
    )
    export.export_checkpoint(path, tmp_path / "out", onnx=True)
    (built,) = exported
    for key, value in module.state_dict().items():
        torch.testing.assert_close(built.state_dict()[key], value, rtol=0, atol=0, msg=key)
