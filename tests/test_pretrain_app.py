"""The pretraining app end to end: a short SimCLR run learns, and its export loads anywhere.

One real run (module fixture) on a dedicated synthetic dataset; its metrics.csv shows the
loss falling and the kNN monitor next to its references; its backbone/ folder loads in plain timm (local-dir:),
in a segmentation_models_pytorch encoder and through the fine-tuning network; the export
command rebuilds the same file from last.ckpt. Bad configs fail before any training step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pandas as pd
import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file

from ssl_mt.data.synthetic import generate_dataset
from ssl_mt.export import main as export_main
from ssl_mt.models.backbone import BackboneError
from ssl_mt.models.knn import knn_predict
from ssl_mt.models.multitask_net import MultiTaskNet, timm_key
from ssl_mt.pretrain import build_module, run
from tests.helpers import cause_chain, compose_app

ROOT = Path(__file__).resolve().parents[1]
NAME = "test_efficientnet"
EPOCHS = 4


def quick_cfg(root: Path, run_dir: Path, *extra: str):
    return compose_app(
        "pretrain",
        [
            "experiment=quick",
            f"data.root={root}",
            f"run_dir={run_dir}",
            "ckpt_path=null",
            "++trainer.enable_progress_bar=false",
            "data.num_workers=0",
            "data.pin_memory=false",
            "schedule.stages=[{size:64,epochs:1,batch_size:16}]",
            "schedule.eval_sizes=[64]",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def knn_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """160 images of 64 px; 30% irrelevant (no person), every cell labeled, 30% val.

    The val split (48 images) is the kNN monitor's query set, the train split its bank.
    """
    root = tmp_path_factory.mktemp("pretrain_knn") / "data"
    return generate_dataset(
        root,
        n=160,
        size=64,
        seed=1,
        irrelevant_fraction=0.3,
        unlabeled_fraction=0.0,
        val_fraction=0.3,
        test_fraction=0.0,
        workers=1,
        progress=False,
    )


@pytest.fixture(scope="module")
def run_dir(knn_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pretrain_run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = quick_cfg(
            knn_root,
            out,
            f"schedule.stages=[{{size:64,epochs:{EPOCHS},batch_size:16}}]",
            "seed=0",
        )
        assert run(cfg) == out
    finally:
        torch.set_num_threads(threads)
    return out


def epoch_values(run_dir: Path, column: str) -> pd.Series:
    frame = pd.read_csv(run_dir / "metrics.csv")
    assert column in frame.columns, f"{column} not logged; columns: {list(frame.columns)}"
    rows = frame.dropna(subset=[column])
    return rows.groupby("epoch")[column].last()


# -- the run learns ---------------------------------------------------------------------------
@pytest.mark.slow
def test_loss_falls_and_views_are_told_apart_better(run_dir: Path):
    loss = epoch_values(run_dir, "train/loss")
    assert list(loss.index) == list(range(EPOCHS))
    # An epoch is 7 steps: compare the mean of the second half of the run with the first
    # epoch, not two single noisy epochs.
    assert loss.iloc[EPOCHS // 2 :].mean() < loss.iloc[0] - 0.3, loss.to_dict()
    top1 = epoch_values(run_dir, "train/contrastive_top1")
    assert top1.iloc[EPOCHS // 2 :].mean() > top1.iloc[0], top1.to_dict()


def _run_cfg(knn_root: Path, run_dir: Path):
    """The config the ``run_dir`` fixture trained with."""
    return quick_cfg(
        knn_root, run_dir, f"schedule.stages=[{{size:64,epochs:{EPOCHS},batch_size:16}}]", "seed=0"
    )


def _knn_accuracies(module, cfg) -> dict[str, float]:
    """kNN top-1 per task of ``module``'s features, recomputed with ``knn_predict`` from the
    monitor's bank (loader 0) and query (loader 1) loaders."""
    datamodule = instantiate(cfg.data, _recursive_=False, _convert_="all")
    datamodule.setup("fit")
    datamodule.trainer = SimpleNamespace(world_size=1, global_rank=0, current_epoch=EPOCHS - 1)
    tasks = list(datamodule.knn_tasks)
    parts = []
    with torch.no_grad():
        for loader in datamodule.val_dataloader():
            feats, labels = [], []
            for batch in loader:
                feats.append(module.features(batch["image"]).float())
                labels.append(torch.stack([batch["target"][t.name] for t in tasks], dim=1))
            parts.append((torch.cat(feats), torch.cat(labels)))
    (bank, bank_labels), (query, query_labels) = parts
    out = {}
    for column, task in enumerate(tasks):
        in_bank, in_query = bank_labels[:, column] >= 0, query_labels[:, column] >= 0
        predicted = knn_predict(
            bank[in_bank],
            bank_labels[in_bank, column],
            query[in_query],
            task.num_classes,
            k=int(cfg.method.knn.k),
            temperature=float(cfg.method.knn.temperature),
        )
        out[task.name] = float((predicted == query_labels[in_query, column]).float().mean())
    return out


@pytest.mark.slow
def test_knn_monitor_logs_the_random_backbone_and_the_majority_rate(run_dir: Path, knn_root: Path):
    """The monitor runs every epoch, next to the two references its curve needs, and logs
    what ``knn_predict`` gives on the features of the backbone it names.

    ``knn/<task>/random`` is the backbone before the first step (one row, step 0; rebuilt
    here from the seed), ``knn/<task>/top1`` the last checkpoint's, and
    ``knn/<task>/majority`` the rate of always answering the bank's most frequent class.
    Catches a monitor that scores other features than the model's (or a made-up number),
    which a threshold on the accuracy cannot: relevance's majority rate alone is about 0.7.
    """
    accuracy = epoch_values(run_dir, "knn/relevance/top1")
    assert list(accuracy.index) == list(range(EPOCHS))  # measured every epoch
    table = pd.read_csv(knn_root / "labels.csv")
    frame = pd.read_csv(run_dir / "metrics.csv")
    cfg = _run_cfg(knn_root, run_dir)
    L.seed_everything(0, workers=True, verbose=False)  # as prepare_run: the same init
    datamodule = instantiate(cfg.data, _recursive_=False, _convert_="all")
    datamodule.setup("fit")
    random = _knn_accuracies(build_module(cfg).eval(), cfg)
    trained = build_module(cfg, init_weights=False)
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["epoch"] == EPOCHS - 1
    trained.load_state_dict(state["state_dict"])
    final = _knn_accuracies(trained.eval(), cfg)
    for task in ("relevance", "tone"):
        majority = epoch_values(run_dir, f"knn/{task}/majority")
        bank = table[(table.split == "train") & table[task].notna()][task]
        queries = table[(table.split == "val") & table[task].notna()][task]
        expected = (queries == bank.value_counts().idxmax()).mean()
        assert majority.iloc[-1] == pytest.approx(expected), task
        logged = frame.dropna(subset=[f"knn/{task}/random"])
        assert list(logged["step"]) == [0], task  # once, before any step
        assert logged[f"knn/{task}/random"].iloc[0] == pytest.approx(random[task], abs=1e-6)
        top1 = epoch_values(run_dir, f"knn/{task}/top1")
        assert top1.iloc[-1] == pytest.approx(final[task], abs=1e-6), task


@pytest.mark.slow
def test_run_writes_export_checkpoint_and_metrics(run_dir: Path):
    for name in (
        "backbone/model.safetensors",
        "backbone/config.json",
        "metrics.csv",
        "checkpoints/last.ckpt",
    ):
        assert (run_dir / name).is_file(), name
    config = json.loads((run_dir / "backbone" / "config.json").read_text())
    assert config["architecture"] == NAME
    assert config["num_classes"] == 0
    assert config["pretrained_cfg"]["input_size"] == [3, 64, 64]
    assert config["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406]  # conf/augment/skin.yaml
    assert config["ssl_mt"]["method"] == "SimCLRModule"
    state = load_file(str(run_dir / "backbone" / "model.safetensors"))
    assert config["ssl_mt"]["num_tensors"] == len(state)
    assert not [k for k in state if k.startswith("classifier")]


# -- the export loads without ssl_mt ------------------------------------------------------------
def assert_holds_the_file(state: dict[str, torch.Tensor], file_state: dict[str, torch.Tensor]):
    for key, tensor in state.items():
        assert key in file_state, f"{key} is not in the file"
        torch.testing.assert_close(tensor, file_state[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("num_classes", [0, 5])
def test_export_loads_in_plain_timm(run_dir: Path, num_classes: int):
    path = run_dir / "backbone" / "model.safetensors"
    model = timm.create_model(
        NAME, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay={"file": str(path)}
    )
    file_state = load_file(str(path))
    backbone = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    assert set(backbone) == set(file_state)  # only the classifier may be absent from the file
    assert_holds_the_file(backbone, file_state)


@pytest.mark.slow
def test_export_folder_loads_with_timm_local_dir_every_key_matched(run_dir: Path):
    folder = run_dir / "backbone"
    model = timm.create_model(f"local-dir:{folder}", pretrained=True)  # strict load
    file_state = load_file(str(folder / "model.safetensors"))
    assert model.num_classes == 0
    assert set(model.state_dict()) == set(file_state)
    assert_holds_the_file(model.state_dict(), file_state)
    data = timm.data.resolve_data_config({}, model=model)
    assert tuple(data["input_size"]) == (3, 64, 64)


@pytest.mark.slow
def test_export_loads_in_smp_and_multitasknet(run_dir: Path, default_tasks):
    path = run_dir / "backbone" / "model.safetensors"
    file_state = load_file(str(path))
    encoder = smp.Unet(f"tu-{NAME}", encoder_weights=None).encoder.model
    result = encoder.load_state_dict(file_state, strict=False)
    assert result.missing_keys == []
    assert_holds_the_file(encoder.state_dict(), file_state)

    for weights in (path, path.parent):  # the file or its folder
        net = MultiTaskNet(NAME, default_tasks, decoder_channels=[32, 16, 16, 8, 8])
        loaded, _ = net.load_encoder_weights(weights)
        assert loaded == len(net.timm_encoder.state_dict())
    assert_holds_the_file(
        {timm_key(k): v for k, v in net.timm_encoder.state_dict().items()}, file_state
    )


@pytest.mark.slow
def test_export_command_rebuilds_the_runs_export_from_last_ckpt(run_dir: Path, tmp_path: Path):
    out = tmp_path / "from_ckpt"
    assert export_main([str(run_dir / "checkpoints" / "last.ckpt"), "--out", str(out)]) == 0
    exported = load_file(str(out / "model.safetensors"))
    original = load_file(str(run_dir / "backbone" / "model.safetensors"))
    assert set(exported) == set(original)
    assert_holds_the_file(exported, original)
    # The same config too (the run's normalisation comes from RUN/.hydra), but provenance.
    rebuilt = json.loads((out / "config.json").read_text())
    written = json.loads((run_dir / "backbone" / "config.json").read_text())
    assert rebuilt["pretrained_cfg"] == written["pretrained_cfg"]
    assert rebuilt["architecture"] == NAME


@pytest.mark.slow
def test_weights_that_do_not_fit_the_backbone_name_the_keys(
    run_dir: Path, synthetic_root: Path, tmp_path: Path
):
    weights = run_dir / "backbone"
    cfg = quick_cfg(
        synthetic_root, tmp_path, "backbone.name=efficientnet_b0", f"backbone.weights={weights}"
    )
    with pytest.raises(Exception, match=r"does not fit the model") as info:
        run(cfg)
    error = next(e for e in cause_chain(info.value) if isinstance(e, BackboneError))
    assert "shape mismatch(es)" in str(error) and "conv_stem.weight" in str(error)
    assert not (tmp_path / "checkpoints").exists()


# -- bad configs fail before training -----------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "error", "match"),
    [
        (
            "schedule.stages=[{size:64,epochs:1,batch_size:1}]",
            ValueError,
            r"batch_size=1: contrastive learning needs at least 2 images per device",
        ),
        ("method.temperature=0", ValueError, r"temperature must be > 0, got 0"),
        ("method.temperature=-0.5", ValueError, r"temperature must be > 0, got -0\.5"),
        (
            "backbone.name=efficientnet_b5x",
            BackboneError,
            r"unknown timm model 'efficientnet_b5x'\. Did you mean: .*efficientnet_b5\b",
        ),
    ],
    ids=["batch-1", "temperature-0", "temperature-negative", "unknown-backbone"],
)
def test_bad_config_fails_before_training(synthetic_root, tmp_path, override, error, match):
    cfg = quick_cfg(synthetic_root, tmp_path, override)
    with pytest.raises(Exception, match=match) as info:
        run(cfg)
    assert any(isinstance(e, error) for e in cause_chain(info.value))
    assert not (tmp_path / "checkpoints").exists()
    assert not (tmp_path / "metrics.csv").exists()
    assert not (tmp_path / "backbone").exists()


# -- the command line ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_command_line_run_writes_the_run_directory(synthetic_root: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ssl_mt.pretrain",
            "experiment=quick",
            f"data.root={synthetic_root}",
            f"hydra.run.dir={run_dir}",
            "schedule.stages=[{size:64,epochs:1,batch_size:16}]",
            "schedule.eval_sizes=[64]",
            "data.num_workers=0",
            "++trainer.enable_progress_bar=false",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name in (
        "backbone/model.safetensors",
        "backbone/config.json",
        "metrics.csv",
        "checkpoints/last.ckpt",
        ".hydra/config.yaml",
    ):
        assert (run_dir / name).is_file(), f"{name} missing; stderr: {result.stderr[-2000:]}"
    assert "train/loss" in pd.read_csv(run_dir / "metrics.csv").columns
