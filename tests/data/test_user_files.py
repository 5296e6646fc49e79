"""Files as users bring them: palette masks, masks saved as JPEG, image folders with hidden
files (macOS ``._*`` companions) and unreadable images."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ssl_mt.data.check import check_dataset, check_image_folder
from ssl_mt.data.image_io import BadSampleError, lossy_format, read_mask
from ssl_mt.data.manifest import ManifestError, list_image_folder
from tests.helpers import compose_app


def _square_mask(h: int = 40, w: int = 48) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    mask[8:30, 10:36] = 1
    return mask


def _save_palette_png(path: Path, indices: np.ndarray, palette: list[int]) -> None:
    image = Image.fromarray(indices, mode="L").convert("P")  # a "P" image of the same bytes
    image.putdata(indices.ravel().tolist())
    image.putpalette(palette)
    image.save(path)


def test_palette_mask_is_read_as_its_indices(tmp_path: Path) -> None:
    # Index 0 drawn white and index 1 black, as a tool's colour scheme may: colours must not
    # matter, only the indices (OpenCV would expand this file to 3 BGR channels).
    indices = _square_mask()
    indices[0, 0] = 2
    path = tmp_path / "mask.png"
    _save_palette_png(path, indices, [255, 255, 255, 0, 0, 0, 0, 128, 0])
    assert Image.open(path).mode == "P"
    assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED).ndim == 3

    mask = read_mask(path, expected_hw=indices.shape)
    np.testing.assert_array_equal(mask, (indices > 0).astype(np.uint8))


def test_jpeg_mask_is_refused_unless_thresholded(tmp_path: Path) -> None:
    truth = _square_mask()
    path = tmp_path / "mask.jpg"
    assert cv2.imwrite(str(path), truth * 255, [cv2.IMWRITE_JPEG_QUALITY, 90])
    decoded = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    assert (decoded > 0).sum() > truth.sum()  # the noise "non-zero = foreground" would take

    with pytest.raises(BadSampleError, match="JPEG") as info:
        read_mask(path)
    assert str(path) in str(info.value) and "data.allow_lossy_masks" in str(info.value)

    mask = read_mask(path, expected_hw=truth.shape, lossy_threshold=128)
    assert (mask != truth).mean() < 0.01

    # Judged by the bytes, not the name.
    disguised = tmp_path / "disguised.png"
    shutil.copy(path, disguised)
    assert lossy_format(disguised) == "JPEG"
    with pytest.raises(BadSampleError, match="JPEG"):
        read_mask(disguised)


def _with_jpeg_mask(root: Path, tmp_path: Path) -> tuple[Path, int, str]:
    """A copy of ``root`` whose first skin mask of the train split is a JPEG file."""
    copy = tmp_path / "data"
    shutil.copytree(root, copy)
    table = pd.read_csv(copy / "labels.csv", dtype=str, keep_default_na=False)
    i = next(i for i, row in table.iterrows() if row["skin_mask"] and row["split"] == "train")
    png = copy / table.at[i, "skin_mask"]
    jpg = png.with_suffix(".jpg")
    foreground = cv2.imread(str(png), cv2.IMREAD_GRAYSCALE) > 0
    assert cv2.imwrite(str(jpg), foreground.astype(np.uint8) * 255)
    table.at[i, "skin_mask"] = str(jpg.relative_to(copy))
    table.to_csv(copy / "labels.csv", index=False)
    return copy, i + 2, table.at[i, "skin_mask"]


def test_check_flags_jpeg_masks(synthetic_root: Path, tmp_path: Path, default_tasks) -> None:
    root, line, name = _with_jpeg_mask(synthetic_root, tmp_path)
    report = check_dataset(root, default_tasks, workers=1)
    assert len(report.problems) == 1, report.problems
    assert f"row {line}" in report.problems[0] and name in report.problems[0]
    assert "JPEG" in report.problems[0]
    assert check_dataset(root, default_tasks, workers=1, lossy_mask_threshold=128).ok


def _datamodule(root: Path, *overrides: str):
    from hydra.utils import instantiate

    cfg = compose_app("finetune", ["experiment=quick", f"data.root={root}", *overrides])
    return instantiate(cfg.data, _recursive_=False, _convert_="all")


def test_training_refuses_jpeg_masks_unless_allowed(synthetic_root: Path, tmp_path: Path) -> None:
    root, line, name = _with_jpeg_mask(synthetic_root, tmp_path)
    with pytest.raises(ManifestError, match="JPEG") as info:
        _datamodule(root).setup("fit")
    assert f"row {line}, column skin_mask" in str(info.value) and name in str(info.value)

    allowed = _datamodule(root, "data.allow_lossy_masks=true")
    allowed.setup("fit")
    dataset = allowed.eval_loader(allowed.samples["train"], allowed.tasks, 64).dataset
    index = next(k for k, s in enumerate(dataset.samples) if s.row == line)
    item = dataset[(0, index)]
    assert bool(item["present"]["skin"]) and 0 < float(item["target"]["skin"].mean()) < 1


def _write_folder(folder: Path) -> dict[str, Path]:
    """Two good images, macOS companions and hidden files that only look like images."""
    rng = np.random.default_rng(0)
    files = {
        "good": folder / "a.jpg",
        "nested": folder / "sub" / "b.png",
        "companion": folder / "._a.jpg",
        "hidden_dir": folder / ".thumbnails" / "c.jpg",
        "macosx": folder / "__MACOSX" / "sub" / "._b.png",
    }
    for key, path in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if key in ("good", "nested", "hidden_dir"):
            image = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            assert cv2.imwrite(str(path), image)
        else:  # AppleDouble header: not an image at all
            path.write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " * 8)
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" * 16)
    return files


def test_image_folder_skips_hidden_files(tmp_path: Path) -> None:
    files = _write_folder(tmp_path / "photos")
    assert list_image_folder(tmp_path / "photos") == [files["good"], files["nested"]]


def test_check_lists_every_unreadable_image_of_a_folder(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    files = _write_folder(folder)
    report = check_image_folder(folder, workers=1)
    assert report.ok and report.n_images == 2 and report.n_hidden == 3

    truncated = folder / "cut.jpg"
    truncated.write_bytes(files["good"].read_bytes()[:300])
    garbage = folder / "sub" / "garbage.png"
    garbage.write_bytes(b"not a picture")
    result = subprocess.run(
        [sys.executable, "-m", "ssl_mt.data", "check", str(folder), "--workers", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "2 problem(s)" in result.stdout
    assert str(truncated) in result.stdout and str(garbage) in result.stdout
    assert "._a.jpg" not in result.stdout


def test_prepare_keeps_a_palette_mask(synthetic_root: Path, tmp_path: Path, default_tasks) -> None:
    from ssl_mt.data.prepare import prepare_dataset

    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    table = pd.read_csv(root / "labels.csv", dtype=str, keep_default_na=False)
    name = next(m for m in table["skin_mask"] if m)
    mask = cv2.imread(str(root / name), cv2.IMREAD_GRAYSCALE) > 0
    _save_palette_png(root / name, mask.astype(np.uint8), [0, 0, 0, 255, 0, 255])

    out = prepare_dataset(root, tmp_path / "out", 32, workers=1, tasks=default_tasks)
    resized = read_mask(out / name)
    expected = cv2.resize(mask.astype(np.uint8), (32, 32), interpolation=cv2.INTER_NEAREST_EXACT)
    np.testing.assert_array_equal(resized, expected)
