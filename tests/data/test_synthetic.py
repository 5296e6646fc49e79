"""The synthetic generator: format, determinism, and labels that agree with the pixels."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from ssl_mt.data.image_io import read_image, read_mask
from ssl_mt.data.manifest import load_manifest
from ssl_mt.data.synthetic import COLUMNS, MONK_RGB, TONE_CLASSES, generate_dataset


def _table(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "labels.csv", dtype=str, keep_default_na=False)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def fully_labeled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every image has a person and every cell is labeled."""
    root = tmp_path_factory.mktemp("full") / "data"
    return generate_dataset(
        root,
        n=60,
        size=96,
        seed=1,
        irrelevant_fraction=0.0,
        unlabeled_fraction=0.0,
        workers=1,
        progress=False,
    )


def test_writes_the_manifest_format(synthetic_root: Path, default_tasks) -> None:
    table = _table(synthetic_root)
    assert tuple(table.columns) == COLUMNS
    assert len(table) == 48
    assert (table["image"] != "").all()
    # (this fixture has no test split; the default 15 % is checked below)
    assert set(table["split"]) == {"train", "val"}
    samples = load_manifest(synthetic_root, default_tasks)  # the loader accepts it as is
    assert len(samples) == 48
    image = read_image(samples[0].image)
    assert image.shape == (64, 64, 3)
    assert (synthetic_root / "images" / "00000.jpg").read_bytes()[:2] == b"\xff\xd8"


def test_same_seed_gives_identical_files_whatever_the_workers(tmp_path: Path) -> None:
    one = generate_dataset(tmp_path / "one", n=12, size=48, seed=3, workers=1, progress=False)
    two = generate_dataset(tmp_path / "two", n=12, size=48, seed=3, workers=2, progress=False)
    assert _files(one) == _files(two)


def test_another_seed_gives_other_images(tmp_path: Path, synthetic_root: Path) -> None:
    other = generate_dataset(tmp_path / "other", n=4, size=64, seed=1, workers=1, progress=False)
    for name in ("00000.jpg", "00001.jpg", "00002.jpg", "00003.jpg"):
        assert (other / "images" / name).read_bytes() != (
            synthetic_root / "images" / name
        ).read_bytes()


def test_irrelevant_rows_have_no_person_labels(synthetic_root: Path) -> None:
    table = _table(synthetic_root)
    irrelevant = table[table["relevance"] == "irrelevant"]
    assert len(irrelevant) > 0
    assert (irrelevant[["skin_mask", "scalp_mask", "tone"]] == "").all().all()
    relevant = table[table["relevance"] == "relevant"]
    assert len(relevant) > 0
    for column in ("skin_mask", "scalp_mask"):
        paths = relevant[column][relevant[column] != ""]
        assert len(paths) > 0
        for path in paths:
            assert (synthetic_root / path).is_file()


def test_fully_labeled_relevant_rows_have_every_label(fully_labeled: Path) -> None:
    table = _table(fully_labeled)
    assert (table["relevance"] == "relevant").all()
    assert (table[["skin_mask", "scalp_mask", "blur", "tone"]] != "").all().all()


def test_masks_agree_with_the_pixels(fully_labeled: Path) -> None:
    """Skin under the skin mask has the Monk colour of its tone label; scalp shows skin."""
    table = _table(fully_labeled)
    measured, expected, scalp_error = [], [], []
    for row in table.itertuples():
        image = read_image(fully_labeled / row.image).astype(np.float32)
        skin = read_mask(fully_labeled / row.skin_mask, expected_hw=image.shape[:2])
        scalp = read_mask(fully_labeled / row.scalp_mask, expected_hw=image.shape[:2])
        assert skin.sum() > 50, row.image
        assert scalp.sum() > 0, row.image
        assert not (skin & scalp).any(), "skin and scalp masks overlap"
        if row.blur != "sharp":
            continue
        colour = MONK_RGB[TONE_CLASSES.index(row.tone)]
        inner = cv2.erode(skin, np.ones((3, 3), np.uint8)) > 0  # away from JPEG edge bleed
        mean = image[inner].mean(axis=0)
        assert np.abs(mean - colour).max() < 12, (row.image, row.tone, mean)
        measured.append(_luma(mean))
        expected.append(_luma(colour))
        scalp_error.append(np.abs(image[scalp > 0].mean(axis=0) - colour).max())
    assert len(measured) >= 10
    # Darker Monk tones give darker skin pixels (rank correlation).
    ranks = np.corrcoef(np.argsort(np.argsort(measured)), np.argsort(np.argsort(expected)))[0, 1]
    assert ranks > 0.9
    assert np.median(scalp_error) < 25


def _luma(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def test_blur_labels_agree_with_the_pixels(fully_labeled: Path) -> None:
    table = _table(fully_labeled)
    sharpness: dict[str, list[float]] = {"sharp": [], "slight": [], "strong": []}
    for row in table.itertuples():
        gray = cv2.cvtColor(read_image(fully_labeled / row.image), cv2.COLOR_RGB2GRAY)
        sharpness[row.blur].append(cv2.Laplacian(gray, cv2.CV_64F).var())
    means = {level: np.mean(values) for level, values in sharpness.items()}
    assert means["sharp"] > means["slight"] > means["strong"]


def test_scalp_regions_are_solid_shapes_not_speckle(fully_labeled: Path) -> None:
    """At 96 px most scalp masks survive a 3x3 erosion: shapes a 64-96 px model can segment
    (sub-pixel strands and 1-2 px partings vanish under it, and under the training resize)."""
    kept = []
    for row in _table(fully_labeled).itertuples():
        scalp = read_mask(fully_labeled / row.scalp_mask)
        eroded = cv2.erode(scalp, np.ones((3, 3), np.uint8))
        kept.append((eroded > 0).sum() / max(1, (scalp > 0).sum()))
    assert np.mean(np.array(kept) >= 0.3) >= 0.75, np.round(kept, 2)


def test_blur_levels_stay_apart_after_the_training_resize(fully_labeled: Path) -> None:
    """96 px images resized to 64 px (the demo's first stage): "slight" stays far from
    "sharp" in high-frequency energy, so the blur head has something to learn."""
    energy: dict[str, list[float]] = {"sharp": [], "slight": [], "strong": []}
    for row in _table(fully_labeled).itertuples():
        gray = cv2.cvtColor(read_image(fully_labeled / row.image), cv2.COLOR_RGB2GRAY)
        small = cv2.resize(gray, (64, 64), interpolation=cv2.INTER_AREA)
        energy[row.blur].append(cv2.Laplacian(small, cv2.CV_64F).var())
    median = {level: np.median(values) for level, values in energy.items()}
    assert median["slight"] < 0.25 * median["sharp"], median
    assert median["strong"] < 0.5 * median["slight"], median


def test_unlabeled_images_have_no_label_at_all_and_only_in_train(tmp_path: Path) -> None:
    root = generate_dataset(
        tmp_path / "d",
        n=200,
        size=32,
        seed=0,
        unlabeled_fraction=0.0,
        val_fraction=0.2,
        unlabeled_images=0.6,
        workers=1,
        progress=False,
    )
    table = _table(root)
    empty = (table[list(COLUMNS[2:])] == "").all(axis=1)
    train = table["split"] == "train"
    assert 0.45 < empty[train].mean() < 0.75
    assert not empty[~train].any()  # val and test stay labeled: every run is scored on them
    masked = {p.name.split("_")[0] for p in (root / "masks").iterdir()}
    assert not masked & {Path(image).stem for image in table.loc[empty, "image"]}


def test_unlabeled_fraction_is_roughly_respected(tmp_path: Path) -> None:
    root = generate_dataset(
        tmp_path / "d",
        n=300,
        size=32,
        seed=0,
        irrelevant_fraction=0.0,
        unlabeled_fraction=0.3,
        val_fraction=0.2,
        workers=1,
        progress=False,
    )
    table = _table(root)
    for column in ("skin_mask", "scalp_mask", "blur", "tone", "relevance"):
        assert 0.22 < (table[column] == "").mean() < 0.38, column
    assert 0.13 < (table["split"] == "val").mean() < 0.27
    assert 0.08 < (table["split"] == "test").mean() < 0.22  # the default 0.15
    # Cells of a mask column that are empty have no file behind them.
    written = {str(p.relative_to(root)) for p in (root / "masks").iterdir()}
    assert written == set(table["skin_mask"][table["skin_mask"] != ""]) | set(
        table["scalp_mask"][table["scalp_mask"] != ""]
    )


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n": 0}, "n"),
        ({"size": 16}, "size"),
        ({"irrelevant_fraction": 1.0}, "irrelevant_fraction"),
        ({"unlabeled_fraction": -0.1}, "unlabeled_fraction"),
        ({"val_fraction": 1.5}, "val_fraction"),
        ({"unlabeled_images": 1.0}, "unlabeled_images"),
        ({"test_fraction": -0.1}, "test_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "test_fraction"),
    ],
)
def test_bad_arguments_raise(tmp_path: Path, kwargs: dict, name: str) -> None:
    arguments = {"n": 2, "size": 32, "progress": False, **kwargs}
    with pytest.raises(ValueError, match=name):
        generate_dataset(tmp_path / "d", **arguments)


def test_cli_generate(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ssl_mt.data",
            "generate",
            "--out",
            str(out),
            "--n",
            "3",
            "--size",
            "32",
            "--seed",
            "5",
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    direct = generate_dataset(tmp_path / "direct", n=3, size=32, seed=5, workers=1, progress=False)
    assert _files(out) == _files(direct)
    bad = subprocess.run(
        [sys.executable, "-m", "ssl_mt.data", "generate", "--out", str(out), "--n", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "n must be >= 1" in bad.stderr
