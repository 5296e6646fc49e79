"""``python -m ssl_mt.predict CKPT INPUT --out DIR``: masks at original size, a probabilities
csv, overlays, metrics on a labeled manifest, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from ssl_mt.data.image_io import read_mask
from ssl_mt.data.manifest import load_manifest
from ssl_mt.finetune import run
from ssl_mt.predict import main, predict
from ssl_mt.tasks import parse_tasks
from tests.helpers import block_network, compose_app

SEG = ("skin", "scalp")
CLS = {"blur": 3, "tone": 10, "relevance": 2}


@pytest.fixture(scope="module")
def checkpoint(synthetic_root, tmp_path_factory) -> Path:
    """A fine-tuning checkpoint after one short epoch (2 batches) at 32 px."""
    run_dir = tmp_path_factory.mktemp("predict_run")
    cfg = compose_app(
        "finetune",
        [
            "experiment=quick",
            f"data.root={synthetic_root}",
            f"run_dir={run_dir}",
            "ckpt_path=null",
            "++trainer.enable_progress_bar=false",
            "data.num_workers=0",
            "data.pin_memory=false",
            "schedule.stages=[{size:32,epochs:1,batch_size:8}]",
            "schedule.eval_sizes=[32]",
            "logger=[csv]",
            "~callbacks.predictions",
            "test_after_fit=false",
            "eval_records=false",
            "++trainer.limit_train_batches=2",
            "++trainer.limit_val_batches=1",
        ],
    )
    run(cfg)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    # Predict reads nothing but the checkpoint: not the run's config, not the network.
    shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
    moved = tmp_path_factory.mktemp("moved") / "model.ckpt"
    shutil.copy(ckpt, moved)
    return moved


@pytest.fixture(scope="module")
def photo_folder(synthetic_root, tmp_path_factory) -> Path:
    """Some of the synthetic images in nested folders, plus files that are not photos."""
    folder = tmp_path_factory.mktemp("photos")
    images = sorted((synthetic_root / "images").glob("*.jpg"))[:10]
    for k, path in enumerate(images):
        target = folder / ("a" if k % 2 else "b/c") / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    (folder / "._00001.jpg").write_bytes(b"\x00\x05\x16\x07 mac resource fork")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x.png").write_bytes(b"not an image")
    return folder


def test_folder_gives_masks_at_original_size_and_a_probabilities_csv(
    checkpoint, photo_folder, tmp_path, monkeypatch
):
    block_network(monkeypatch)
    out = tmp_path / "out"
    result = predict(checkpoint, photo_folder, out, batch_size=4, workers=0, overlays=True)
    assert result["images"] == 10 and result["size"] == 32  # the training stage's size
    table = pd.read_csv(out / "predictions.csv")
    relative = sorted(p.relative_to(photo_folder).as_posix() for p in photo_folder.rglob("*.jpg"))
    relative = [r for r in relative if not Path(r).name.startswith("._")]
    assert sorted(table["image"]) == relative
    expected_columns = ["image"]
    for task, n in CLS.items():
        expected_columns += [task, *[f"{task}/p_{c}" for c in range(n)]]
    assert len(table.columns) == len(expected_columns)
    tasks = parse_tasks(compose_app("finetune", []).tasks)
    for task in (t for t in tasks if not t.is_segmentation):
        probabilities = table[[f"{task.name}/p_{c}" for c in task.classes]].to_numpy()
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
        best = [task.classes[i] for i in probabilities.argmax(axis=1)]
        assert list(table[task.name]) == best
    for name in relative:
        image = cv2.imread(str(photo_folder / name))
        for task in SEG:
            mask = cv2.imread(
                str(out / "masks" / task / Path(name).with_suffix(".png")), cv2.IMREAD_UNCHANGED
            )
            assert mask is not None and mask.shape == image.shape[:2], (task, name)
            assert set(np.unique(mask)) <= {0, 255}
        overlay = cv2.imread(str(out / "overlays" / Path(name).with_suffix(".png")))
        assert overlay.shape == image.shape
    # --size overrides the checkpoint's.
    again = predict(checkpoint, photo_folder, tmp_path / "o64", size=64, workers=0)
    assert again["size"] == 64


def test_manifest_metrics_match_the_written_masks(checkpoint, synthetic_root, tmp_path):
    out = tmp_path / "out"
    code = main(
        [
            str(checkpoint),
            str(synthetic_root / "labels.csv"),
            "--out",
            str(out),
            "--metrics",
            "--workers",
            "0",
            "--batch-size",
            "16",
        ]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    tasks = parse_tasks(compose_app("finetune", []).tasks)
    samples = load_manifest(synthetic_root, tasks)
    assert metrics["skin"]["labeled"] == sum(s.labels["skin"] is not None for s in samples)
    assert set(metrics["tone"]) == {"labeled", "top1", "top5", "f1"}
    # IoU of the written 0/255 masks against the labels, over every labeled pixel.
    inter = union = 0
    for sample in samples:
        if sample.labels["skin"] is None:
            continue
        truth = read_mask(sample.labels["skin"]) > 0
        name = sample.image.relative_to(synthetic_root).with_suffix(".png")
        predicted = cv2.imread(str(out / "masks" / "skin" / name), cv2.IMREAD_UNCHANGED) > 0
        inter += int((truth & predicted).sum())
        union += int((truth | predicted).sum())
    assert metrics["skin"]["iou"] == pytest.approx(inter / union, abs=1e-4)
    # Top-1 of the csv's labels against the manifest's.
    table = pd.read_csv(out / "predictions.csv").set_index("image")
    blur = next(t for t in tasks if t.name == "blur")
    labeled = [s for s in samples if s.labels["blur"] is not None]
    hits = sum(
        table.loc[s.image.relative_to(synthetic_root).as_posix(), "blur"]
        == blur.classes[s.labels["blur"]]
        for s in labeled
    )
    assert metrics["blur"]["top1"] == pytest.approx(hits / len(labeled), abs=1e-6)


def test_bad_inputs_are_named(checkpoint, photo_folder, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main([str(checkpoint), str(missing), "--out", str(tmp_path / "o")]) == 2
    assert f"input not found: {missing}" in capsys.readouterr().err
    assert main([str(tmp_path / "no.ckpt"), str(photo_folder), "--out", str(tmp_path / "o")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(photo_folder, broken)
    (broken / "a" / "zz_truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    code = main([str(checkpoint), str(broken), "--out", str(tmp_path / "o2"), "--workers", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "zz_truncated.jpg" in err and "Traceback" not in err
    code = main([str(checkpoint), str(photo_folder), "--out", str(tmp_path / "o3"), "--metrics"])
    assert code == 2 and "--metrics needs labels" in capsys.readouterr().err
