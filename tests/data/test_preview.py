"""Preview grids: masks over images with labels, and SSL views under an augment preset."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from ssl_mt.config import load_group
from ssl_mt.data.image_io import read_image, read_mask
from ssl_mt.data.preview import (
    MASK_ALPHA,
    MASK_COLOURS,
    _letterbox,
    _overlay_tile,
    load_samples,
    preview_grid,
    preview_views,
)


def _read(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, path
    return image


def test_grid_is_written(synthetic_root: Path, tmp_path: Path, default_tasks) -> None:
    out = preview_grid(synthetic_root, tmp_path / "grid.png", default_tasks, n=9, size=64)
    image = _read(out)
    height, width = image.shape[:2]
    assert 3 * 64 <= width <= 3 * 64 + 60  # 3 columns of 64 px tiles plus padding
    assert 3 * 64 < height < 3 * (64 + 100) + 40  # 3 rows with caption lines
    assert image.std() > 20  # not a blank canvas


def test_grid_is_deterministic(synthetic_root: Path, tmp_path: Path, default_tasks) -> None:
    one = preview_grid(synthetic_root, tmp_path / "one.png", default_tasks, n=4, size=48, seed=1)
    two = preview_grid(synthetic_root, tmp_path / "two.png", default_tasks, n=4, size=48, seed=1)
    assert one.read_bytes() == two.read_bytes()


def test_grid_of_a_plain_image_folder(synthetic_root: Path, tmp_path: Path) -> None:
    out = preview_grid(synthetic_root / "images", tmp_path / "folder.png", [], n=4, size=48)
    assert _read(out).std() > 20


@pytest.mark.parametrize("preset", ["simclr", "skin"])
def test_views(synthetic_root: Path, tmp_path: Path, preset: str) -> None:
    augment = load_group("augment", preset)
    out = preview_views(synthetic_root, tmp_path / "views.png", augment, n=3, size=48)
    image = _read(out)
    assert 3 * 48 <= image.shape[1] <= 3 * 48 + 40  # original, view 1, view 2
    assert image.shape[0] > 3 * 48
    assert image.std() > 20


def test_cli(synthetic_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.png"
    command = [sys.executable, "-m", "ssl_mt.data", "preview", str(synthetic_root)]
    result = subprocess.run(
        [*command, "--out", str(out), "--n", "4", "--size", "48"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert _read(out).std() > 20
    missing = subprocess.run(
        [*command[:-1], str(tmp_path / "nowhere"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2
    assert "Traceback" not in missing.stderr and "nowhere" in missing.stderr


def test_overlay_tile_blends_each_mask_exactly_where_it_is_set(
    synthetic_root: Path, default_tasks
) -> None:
    """A tile's pixels against its masks: blended inside, the contour on the edge, the image
    untouched outside. Catches a mask drawn at the wrong place, flipped or resized off the
    image; size bands and ``std() > 20`` cannot."""
    segmentation = [t for t in default_tasks if t.is_segmentation]
    colours = {t.name: MASK_COLOURS[i] for i, t in enumerate(segmentation)}
    sample = next(
        s
        for s in load_samples(synthetic_root, default_tasks)
        if all(s.labels.get(t.name) for t in segmentation)
    )
    size = 48
    for task in segmentation:  # one mask at a time: overlaps would blend twice
        tile, notes = _overlay_tile(sample, [task], colours, size)
        assert notes == []
        image = read_image(sample.image)
        plain = _letterbox(image, size)
        mask = read_mask(sample.labels[task.name], expected_hw=image.shape[:2])
        on = _letterbox(mask, size, cv2.INTER_NEAREST) > 0
        assert 0 < on.sum() < on.size, task.name  # a mask with an inside and an outside
        colour = np.asarray(colours[task.name])
        blended = (plain * (1 - MASK_ALPHA) + colour * MASK_ALPHA).astype(np.uint8)
        contour = (tile == colour).all(axis=2) & ~(plain == colour).all(axis=2)
        assert contour.any(), task.name
        # The contour runs along the mask's edge: every contour pixel borders the mask.
        near = cv2.dilate(on.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        assert near[contour].all(), task.name
        inside, outside = on & ~contour, ~on & ~contour
        assert np.array_equal(tile[inside], blended[inside]), task.name
        assert np.array_equal(tile[outside], plain[outside]), task.name
