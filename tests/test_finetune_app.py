"""The fine-tuning app end to end: composed config → run dir with metrics, predictions, ckpt.

Also: SSL weights reach the encoder, weighting strategies run and log their weights, and
bad configs fail before any training step.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import cv2
import pandas as pd
import pytest
import timm
import torch
from safetensors.torch import save_file

from ssl_mt.compare.ingredients import metric_from_records
from ssl_mt.config import load_tasks_config
from ssl_mt.evaluation.records import COLUMNS, read_records
from ssl_mt.finetune import build_module, run
from ssl_mt.models.backbone import BackboneError
from ssl_mt.schedule import ScheduleError
from ssl_mt.tasks import parse_tasks
from tests.helpers import cause_chain, compose_app

TASKS = ("skin", "scalp", "blur", "tone", "relevance")
SEG = ("skin", "scalp")


def quick_cfg(root: Path, run_dir: Path, *extra: str):
    return compose_app(
        "finetune",
        [
            "experiment=quick",
            f"data.root={root}",
            f"run_dir={run_dir}",
            "ckpt_path=null",
            "++trainer.enable_progress_bar=false",
            "data.num_workers=0",
            "data.pin_memory=false",
            *extra,
        ],
    )


def metrics(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "metrics.csv")


# -- one real run: logs per evaluation resolution --------------------------------------------


@pytest.fixture(scope="module")
def two_stage_run(synthetic_root, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finetune_run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = quick_cfg(
            synthetic_root,
            run_dir,
            "schedule.stages=[{size:32,epochs:1,batch_size:8},{size:64,epochs:1,batch_size:8}]",
            "schedule.eval_sizes=[32,64]",
        )
        assert run(cfg) == run_dir
    finally:
        torch.set_num_threads(threads)
    return run_dir


def test_validation_metrics_exist_for_every_eval_resolution(two_stage_run: Path):
    df = metrics(two_stage_run)
    expected = {
        "skin": {"loss", "iou", "dice"},
        "scalp": {"loss", "iou", "dice"},
        "blur": {"loss", "top1", "f1"},
        "tone": {"loss", "top1", "top5", "f1"},
        "relevance": {"loss", "top1", "f1"},
    }
    for size in (32, 64):
        assert f"val/{size}/global/loss" in df.columns
        for task, names in expected.items():
            logged = {c.split("/")[-1] for c in df.columns if c.startswith(f"val/{size}/{task}/")}
            assert logged == names, f"val/{size}/{task}: {sorted(logged)}"
        # One value per validation epoch (two epochs), all finite.
        for column in [c for c in df.columns if c.startswith(f"val/{size}/")]:
            values = df[column].dropna()
            assert len(values) == 2, column
            assert values.map(math.isfinite).all(), column
    for task in TASKS:
        assert f"train/{task}/loss" in df.columns
        assert f"weights/{task}" in df.columns
    assert "train/global/loss" in df.columns


def test_global_loss_is_the_sum_of_task_losses_at_that_resolution(two_stage_run: Path):
    df = metrics(two_stage_run)
    for size in (32, 64):
        rows = df[df[f"val/{size}/global/loss"].notna()]
        assert len(rows) == 2
        for _, row in rows.iterrows():
            task_sum = sum(row[f"val/{size}/{task}/loss"] for task in TASKS)
            assert row[f"val/{size}/global/loss"] == pytest.approx(task_sum, rel=1e-5)
    # The train-side global loss too (unweighted sum of the task losses).
    rows = df[df["train/global/loss"].notna()]
    for _, row in rows.iterrows():
        task_sum = sum(row[f"train/{task}/loss"] for task in TASKS)
        assert row["train/global/loss"] == pytest.approx(task_sum, rel=1e-5)


def test_eval_records_reproduce_the_logged_metrics(two_stage_run: Path, synthetic_root: Path):
    """Metrics recomputed from the per-image records equal the logged ones, checkpoint by
    checkpoint: best at its epoch, last at the final epoch."""
    df = metrics(two_stage_run)
    tasks = parse_tasks(load_tasks_config("default"))
    val = df[df["val/64/global/loss"].notna()].set_index("epoch")
    for tag in ("best", "last"):
        info = json.loads((two_stage_run / "eval" / tag / "checkpoint.json").read_text())
        logged = val.loc[info["epoch"]]
        for size in (32, 64):
            path = two_stage_run / "eval" / tag / f"val_{size}.csv.gz"
            records = read_records(path)
            assert list(records.columns) == list(COLUMNS)
            total = 0.0
            for task in tasks:
                rows = records[records["task"] == task.name]
                assert len(rows) > 0 and rows["image"].is_unique
                names = ["loss", *task.metrics]
                if task.name == "blur":  # 3 classes: no top-5 column
                    assert rows["top5"].isna().all()
                for name in names:
                    if name == "top5" and task.num_classes <= 5:
                        continue
                    value = metric_from_records(rows, name, task.num_classes)
                    expected = logged[f"val/{size}/{task.name}/{name}"]
                    assert value == pytest.approx(expected, rel=1e-5, abs=1e-6), (
                        tag,
                        size,
                        task.name,
                        name,
                    )
                total += metric_from_records(rows, "loss")
            assert total == pytest.approx(logged[f"val/{size}/global/loss"], rel=1e-5)
            # The images are the val split's paths as labels.csv writes them.
            manifest = pd.read_csv(synthetic_root / "labels.csv")
            assert set(records["image"]) == set(manifest.loc[manifest["split"] == "val", "image"])


def test_train_size_follows_the_schedule(two_stage_run: Path):
    df = metrics(two_stage_run)
    rows = df[df["train/size"].notna()]
    by_epoch = dict(zip(rows["epoch"].astype(int), rows["train/size"], strict=True))
    assert by_epoch == {0: 32.0, 1: 64.0}
    batch = df[df["train/batch_size"].notna()]
    assert set(batch["train/batch_size"]) == {8.0}
    stages = df[df["train/stage"].notna()]
    assert dict(zip(stages["epoch"].astype(int), stages["train/stage"], strict=True)) == {
        0: 0.0,
        1: 1.0,
    }


def test_run_writes_predictions_per_eval_size_and_checkpoints(two_stage_run: Path):
    predictions = two_stage_run / "predictions"
    for epoch in (0, 1):
        for size in (32, 64):
            path = predictions / f"epoch{epoch:03d}_{size}.png"
            assert path.is_file(), sorted(p.name for p in predictions.iterdir())
            picture = cv2.imread(str(path))
            assert picture is not None and picture.shape[0] > size
    last = two_stage_run / "checkpoints" / "last.ckpt"
    assert last.is_file()
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["epoch"] == 1
    assert any(k.startswith("net.encoder.") for k in state["state_dict"])
    assert any(p.name.startswith("best_epoch") for p in (two_stage_run / "checkpoints").iterdir())


# -- weighting strategies in the module ----------------------------------------------------------


def _short_run(root: Path, run_dir: Path, *extra: str) -> pd.DataFrame:
    cfg = quick_cfg(
        root,
        run_dir,
        "schedule.stages=[{size:32,epochs:3,batch_size:8}]",
        "schedule.eval_sizes=[32]",
        "logger=[csv]",
        "~callbacks.predictions",
        "++trainer.limit_train_batches=2",
        "++trainer.limit_val_batches=1",
        "test_after_fit=false",
        "eval_records=false",
        *extra,
    )
    run(cfg)
    return metrics(run_dir)


def _weights(df: pd.DataFrame) -> pd.DataFrame:
    rows = df[df["weights/skin"].notna()].sort_values("epoch")
    assert list(rows["epoch"].astype(int)) == [0, 1, 2]
    return rows[[f"weights/{t}" for t in TASKS]].reset_index(drop=True)


def test_fixed_weighting_logs_the_configured_loss_weights(synthetic_root, tmp_path):
    df = _short_run(synthetic_root, tmp_path, "weighting=fixed", "tasks.blur.loss_weight=2.5")
    assert not (tmp_path / "eval").exists()  # eval_records=false: no records
    weights = _weights(df)
    assert (weights["weights/blur"] == 2.5).all()
    assert (weights.drop(columns="weights/blur") == 1.0).all().all()
    # total_loss is the weighted sum; global the unweighted one: they differ.
    rows = df[df["train/total_loss"].notna()]
    assert (rows["train/total_loss"] != rows["train/global/loss"]).all()


@pytest.mark.parametrize("weighting", ["uncertainty", "dwa", "famo"])
def test_adaptive_weighting_runs_and_logs_weights(synthetic_root, tmp_path, weighting):
    df = _short_run(synthetic_root, tmp_path, f"weighting={weighting}")
    weights = _weights(df)
    assert weights.map(math.isfinite).all().all()
    assert (weights > 0).all().all()
    for task in TASKS:
        losses = df[f"train/{task}/loss"].dropna()
        assert len(losses) == 3 and losses.map(math.isfinite).all()
    assert df["val/32/global/loss"].dropna().map(math.isfinite).all()
    if weighting == "dwa":
        # Weights are 1 for the first two epochs, then follow the loss ratios (sum = K).
        assert (weights.iloc[:2] == 1.0).all().all()
        assert not (weights.iloc[2] == 1.0).all()
        assert weights.iloc[2].sum() == pytest.approx(len(TASKS), rel=1e-5)
    elif weighting == "famo":
        # Weights c * z_i / L_i, normalised over the tasks of each step: every epoch's
        # mean sums to 1. "Not all 1.0" would hold even for logits that never move.
        assert weights.sum(axis=1).to_numpy() == pytest.approx([1.0] * 3, rel=1e-5)
        assert not weights.iloc[0].equals(weights.iloc[-1])
        # The task logits learned something: softmax(xi) left its uniform start.
        state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
        logits = state["state_dict"]["weighting.logits"]
        assert logits.shape == (len(TASKS),) and not torch.equal(logits, torch.zeros(5))
    else:
        # Learned weights move away from their start in the first steps.
        assert not (weights.iloc[-1] == 1.0).all()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


# -- SSL weights reach the encoder ---------------------------------------------------------------


def _ssl_export(path: Path) -> dict[str, torch.Tensor]:
    """A plain timm state dict of test_efficientnet whose every tensor differs from an init."""
    model = timm.create_model("test_efficientnet", num_classes=0)
    gen = torch.Generator().manual_seed(123)
    state = {}
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            state[key] = (value + 0.5 + torch.rand(value.shape, generator=gen)).contiguous()
        else:
            state[key] = torch.full_like(value, 7)
    save_file(state, str(path))
    return state


def test_backbone_weights_are_loaded_into_the_encoder(tmp_path):
    exported = _ssl_export(tmp_path / "backbone.safetensors")
    random_module = build_module(quick_cfg(tmp_path, tmp_path / "a"))
    loaded_module = build_module(
        quick_cfg(tmp_path, tmp_path / "b", f"backbone.weights={tmp_path / 'backbone.safetensors'}")
    )
    random_state = random_module.net.encoder_state_for_timm()
    loaded_state = loaded_module.net.encoder_state_for_timm()
    n_encoder = len(loaded_module.net.timm_encoder.state_dict())
    assert random_module.encoder_tensors_loaded == 0
    assert loaded_module.encoder_tensors_loaded == n_encoder == len(loaded_state)
    assert set(loaded_state) <= set(exported)
    assert set(exported) - set(loaded_state), "the export has tensors (the head) the encoder lacks"
    for key, value in loaded_state.items():
        torch.testing.assert_close(value, exported[key], rtol=0, atol=0, msg=key)
        assert not torch.equal(random_state[key], exported[key]), key
    # Decoder and heads are untouched by the export: same shapes, still random.
    assert loaded_module.net.heads["tone"].fc.weight.abs().max() < 1.0


def test_backbone_weights_of_another_model_name_the_mismatched_keys(tmp_path):
    other = timm.create_model("test_resnet", num_classes=0)
    save_file(
        {k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "r.safetensors")
    )
    cfg = quick_cfg(tmp_path, tmp_path / "run", f"backbone.weights={tmp_path / 'r.safetensors'}")
    # Hydra's instantiate wraps the error; the message and the cause are the BackboneError's.
    with pytest.raises(
        Exception, match=r"(?s)does not fit.*missing key\(s\).*conv_stem\.weight"
    ) as info:
        build_module(cfg)
    assert any(isinstance(e, BackboneError) for e in cause_chain(info.value))


def test_backbone_weights_with_a_wrong_shape_name_the_key(tmp_path):
    exported = _ssl_export(tmp_path / "ok.safetensors")
    exported["conv_stem.weight"] = torch.zeros(5, 3, 3, 3)
    save_file(exported, str(tmp_path / "bad.safetensors"))
    cfg = quick_cfg(tmp_path, tmp_path / "run", f"backbone.weights={tmp_path / 'bad.safetensors'}")
    with pytest.raises(
        Exception, match=r"shape mismatch.*conv_stem\.weight: file \(5, 3, 3, 3\)"
    ) as info:
        build_module(cfg)
    assert any(isinstance(e, BackboneError) for e in cause_chain(info.value))


def test_missing_weights_file_is_a_clear_error(tmp_path):
    cfg = quick_cfg(
        tmp_path, tmp_path / "run", f"backbone.weights={tmp_path / 'nothere.safetensors'}"
    )
    with pytest.raises(Exception, match=r"weights file not found: .*nothere\.safetensors") as info:
        build_module(cfg)
    assert any(isinstance(e, FileNotFoundError) for e in cause_chain(info.value))


def test_mt_ssl_without_weights_refuses_to_start(tmp_path):
    cfg = compose_app("finetune", ["experiment=mt_ssl", f"run_dir={tmp_path}"])
    with pytest.raises(ValueError, match=r"experiment=mt_ssl needs backbone\.weights=PATH"):
        build_module(cfg)
    with pytest.raises(ValueError, match=r"backbone\.weights"):
        run(cfg)
    assert not (tmp_path / "checkpoints").exists()


# -- bad configs fail before training ------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "error", "match"),
    [
        (
            "schedule.stages=[{size:32,epochs:0,batch_size:8}]",
            ScheduleError,
            r"stages\[0\]\.epochs must be >= 1, got 0",
        ),
        (
            "schedule.stages=[{size:48,epochs:1,batch_size:8}]",
            ScheduleError,
            r"size=48: the encoder needs a multiple of 32 \(e\.g\. 64\)",
        ),
        ("schedule.eval_sizes=[32,100]", ValueError, r"each a multiple of 32"),
    ],
    ids=["zero-epochs", "stage-size", "eval-size"],
)
def test_bad_schedule_fails_before_training(synthetic_root, tmp_path, override, error, match):
    cfg = quick_cfg(synthetic_root, tmp_path, override)
    with pytest.raises(Exception, match=match) as info:
        run(cfg)
    assert any(isinstance(e, error) for e in cause_chain(info.value))
    assert not (tmp_path / "checkpoints").exists()
    assert not (tmp_path / "metrics.csv").exists()


def test_task_without_a_csv_column_fails_before_training(synthetic_root, tmp_path):
    cfg = quick_cfg(
        synthetic_root,
        tmp_path,
        "+tasks.age={kind:classification,column:age_group,classes:[young,old]}",
    )
    with pytest.raises(Exception, match=r"no column for task\(s\) age \(column 'age_group'\)"):
        run(cfg)
    assert not (tmp_path / "checkpoints").exists()


def test_a_decoder_that_cannot_take_the_size_fails_opaquely_so_the_config_refuses_it(
    synthetic_root, tmp_path
):
    """Why the 32-multiple rule exists: an FPN decoder adds misaligned maps at 48 px.

    (smp's U-Net resizes each upsampled map to its skip connection, so it runs, misaligned.)
    """
    module = build_module(compose_app("finetune", ["experiment=quick", "model=fpn"]))
    module(torch.randn(1, 3, 64, 64))
    with pytest.raises(RuntimeError, match="must match the size"):
        module(torch.randn(1, 3, 48, 48))
    cfg = quick_cfg(
        synthetic_root, tmp_path, "model=fpn", "schedule.stages=[{size:48,epochs:1,batch_size:8}]"
    )
    with pytest.raises(Exception, match=r"multiple of 32 \(e\.g\. 64\)"):
        run(cfg)


# -- a task without validation labels -----------------------------------------------------------


def test_a_val_split_without_tone_labels_selects_the_best_checkpoint_by_the_global_loss(
    synthetic_root, tmp_path, caplog
):
    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    frame = pd.read_csv(data / "labels.csv", dtype=str, keep_default_na=False)
    frame.loc[frame["split"] == "val", "tone"] = ""
    frame.to_csv(data / "labels.csv", index=False)
    run_dir = tmp_path / "run"
    with caplog.at_level("WARNING", logger="ssl_mt.models.multitask"):
        run(
            quick_cfg(
                data,
                run_dir,
                "schedule.stages=[{size:32,epochs:3,batch_size:8}]",
                "schedule.eval_sizes=[32]",
                "~callbacks.predictions",
                "logger=[csv]",
            )
        )
    df = metrics(run_dir)
    rows = df[df["val/32/global/loss"].notna()]
    losses = dict(zip(rows["epoch"].astype(int), rows["val/32/global/loss"], strict=True))
    assert sorted(losses) == [0, 1, 2] and all(map(math.isfinite, losses.values())), losses
    for _, row in rows.iterrows():  # the sum of the tasks that have val labels
        labeled = sum(row[f"val/32/{t}/loss"] for t in TASKS if t != "tone")
        assert row["val/32/global/loss"] == pytest.approx(labeled, rel=1e-5)
    assert not [c for c in df.columns if c.startswith("val/32/tone/")]
    best = min(losses, key=losses.get)
    assert (run_dir / "checkpoints" / f"best_epoch{best:03d}.ckpt").is_file(), sorted(
        p.name for p in (run_dir / "checkpoints").iterdir()
    )
    named = [r for r in caplog.records if "no labeled sample of task(s) ['tone']" in r.message]
    assert len(named) == 1, "named once, not every epoch"


def test_curve_records_hold_every_epochs_per_image_val_losses(two_stage_run: Path):
    """RUN/eval/curves: per epoch and size, the per-image losses whose task means are the
    logged val losses; at the last epoch, the very losses of the last checkpoint's records."""
    from ssl_mt.callbacks.curve_records import curve_path

    df = metrics(two_stage_run)
    folder = two_stage_run / "eval" / "curves"
    for size in (32, 64):
        logged = df[df[f"val/{size}/global/loss"].notna()].set_index("epoch")
        for epoch in (0, 1):
            curve = pd.read_csv(curve_path(folder, size, epoch))
            assert list(curve.columns) == ["image", "task", "loss"]
            assert not curve.duplicated(["image", "task"]).any()
            for task in TASKS:
                mean = curve.loc[curve["task"] == task, "loss"].mean()
                expected = logged.loc[epoch, f"val/{size}/{task}/loss"]
                assert mean == pytest.approx(expected, rel=1e-5), (size, epoch, task)
        last = read_records(two_stage_run / "eval" / "last" / f"val_{size}.csv.gz")
        final = curve.set_index(["image", "task"])["loss"]
        again = last.set_index(["image", "task"])["loss"].reindex(final.index)
        assert again.notna().all()
        assert final.to_numpy() == pytest.approx(again.to_numpy(), rel=1e-5, abs=1e-6)
