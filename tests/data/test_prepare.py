"""``prepare_dataset``: a downsized copy whose masks still match and that passes check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from ssl_mt.data.check import check_dataset
from ssl_mt.data.image_io import read_image, read_mask, write_png
from ssl_mt.data.prepare import prepare_dataset


def _rows(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "labels.csv", dtype=str, keep_default_na=False)


def test_sizes_are_capped_and_masks_match(
    synthetic_root: Path, tmp_path: Path, default_tasks
) -> None:
    out = prepare_dataset(
        synthetic_root, tmp_path / "small", max_side=40, workers=1, progress=False
    )
    assert (out / "labels.csv").read_bytes() == (synthetic_root / "labels.csv").read_bytes()
    for row in _rows(out).itertuples():
        image = read_image(out / row.image)
        assert image.shape == (40, 40, 3)
        for cell in (row.skin_mask, row.scalp_mask):
            if cell:
                mask = read_mask(out / cell, expected_hw=image.shape[:2])
                original = read_mask(synthetic_root / cell)
                # Nearest-neighbour resizing keeps the mask binary and roughly its area.
                assert abs(mask.mean() - original.mean()) < 0.05
    report = check_dataset(out, default_tasks)
    assert report.ok, report.problems


def test_small_images_are_copied_not_upscaled(synthetic_root: Path, tmp_path: Path) -> None:
    out = prepare_dataset(
        synthetic_root, tmp_path / "same", max_side=128, workers=2, progress=False
    )
    for path in (synthetic_root / "images").iterdir():
        assert (out / "images" / path.name).read_bytes() == path.read_bytes()


def test_aspect_ratio_and_formats_are_kept(tmp_path: Path) -> None:
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (60, 100, 3), dtype=np.uint8)
    mask = np.zeros((60, 100), np.uint8)
    mask[10:30, 20:70] = 255
    write_png(root / "images" / "a.png", image)
    cv2.imwrite(str(root / "images" / "b.jpg"), image[:, :50])
    write_png(root / "masks" / "a.png", mask)
    (root / "labels.csv").write_text(
        "image,skin_mask,blur\nimages/a.png,masks/a.png,sharp\nimages/b.jpg,,slight\n"
    )
    out = prepare_dataset(root, tmp_path / "out", max_side=50, workers=1, progress=False)
    assert read_image(out / "images" / "a.png").shape == (30, 50, 3)
    assert (out / "images" / "a.png").read_bytes()[:4] == b"\x89PNG"
    assert read_image(out / "images" / "b.jpg").shape == (50, 42, 3)
    assert (out / "images" / "b.jpg").read_bytes()[:2] == b"\xff\xd8"
    resized = read_mask(out / "masks" / "a.png", expected_hw=(30, 50))
    assert resized[5:15, 10:35].all() and resized.sum() == 10 * 25


def test_cli_default_out(synthetic_root: Path, tmp_path: Path) -> None:
    root = prepare_dataset(
        synthetic_root, tmp_path / "data", max_side=64, workers=1, progress=False
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ssl_mt.data",
            "prepare",
            str(root),
            "--max-side",
            "32",
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert read_image(tmp_path / "data_32" / "images" / "00000.jpg").shape == (32, 32, 3)
