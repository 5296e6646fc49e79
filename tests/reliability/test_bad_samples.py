"""Bad files met during training: ``raise`` names the file, ``skip`` lists and counts them.

A copy of the synthetic dataset gets a training image replaced by garbage bytes and
(fine-tuning) another training sample's mask resized; ``python -m ssl_mt.data check`` would
catch both before training, here the training path itself is tested. One epoch in a single
batch of all 41 training images, so every sample is read (no ``drop_last`` leftovers).
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from reliability_helpers import cause_chain, per_epoch, read_metrics, run_app, tiny_cfg

from ssl_mt.data.image_io import BadSampleError

pytestmark = pytest.mark.slow

ONE_BATCH = "schedule.stages=[{size:32,epochs:1,batch_size:41}]"


def _corrupt_copy(root: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(dataset copy, the garbage image, the wrongly sized mask) - both in the train split."""
    copy = tmp_path / "data"
    shutil.copytree(root, copy)
    with (copy / "labels.csv").open(newline="") as handle:
        train = [row for row in csv.DictReader(handle) if row["split"] == "train"]
    assert len(train) == 41
    bad_image = copy / train[0]["image"]
    bad_image.write_bytes(b"\x00garbage, not a JPEG\xff" * 40)
    masked = next(row for row in train[1:] if row["skin_mask"])
    bad_mask = copy / masked["skin_mask"]
    assert cv2.imwrite(str(bad_mask), np.zeros((40, 24), np.uint8))
    return copy, bad_image, bad_mask


@pytest.mark.parametrize("app", ["finetune", "pretrain"])
def test_raise_names_the_bad_file(synthetic_root, tmp_path, app):
    data, bad_image, bad_mask = _corrupt_copy(synthetic_root, tmp_path)
    run_dir = tmp_path / "run"
    cfg = tiny_cfg(app, data, run_dir, ONE_BATCH)  # data.on_bad_sample=raise: the default
    assert cfg.data.on_bad_sample == "raise"
    with pytest.raises(Exception) as info:
        run_app(app, cfg)
    assert any(isinstance(e, BadSampleError) for e in cause_chain(info.value)), info.value
    named = {str(bad_image), str(bad_mask)} if app == "finetune" else {str(bad_image)}
    assert any(name in str(info.value) for name in named), str(info.value)
    assert "labels.csv row" in str(info.value) or app == "pretrain"
    assert not (run_dir / "checkpoints").exists()


@pytest.mark.parametrize("app", ["finetune", "pretrain"])
def test_skip_lists_counts_and_finishes(synthetic_root, tmp_path, app):
    data, bad_image, bad_mask = _corrupt_copy(synthetic_root, tmp_path)
    run_dir = tmp_path / "run"
    run_app(app, tiny_cfg(app, data, run_dir, ONE_BATCH, "data.on_bad_sample=skip"))
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    lines = (run_dir / "bad_samples.txt").read_text().splitlines()
    expected = [bad_image, bad_mask] if app == "finetune" else [bad_image]
    for path in expected:
        hits = [line for line in lines if str(path) in line]
        assert hits, f"{path} not in bad_samples.txt:\n" + "\n".join(lines)
        assert any(line.startswith("epoch 0 ") for line in hits), hits
    if app == "finetune":  # the mask's line says what is wrong with it
        assert any("24x40 (WxH) but its image is 64x64" in line for line in lines), lines
    counted = per_epoch(read_metrics(run_dir), "data/bad_samples")
    # Pretraining also meets the image in the kNN bank (validation), after the training count.
    if app == "finetune":
        assert counted == {0: 2.0}
    else:
        assert counted[0] >= 1
