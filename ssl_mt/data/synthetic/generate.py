"""Writing the synthetic dataset: ``labels.csv`` rows, image and mask files, worker processes.

Every image has its own random generator ``np.random.default_rng([seed, index])``: the same
seed writes byte-identical files whatever the number of worker processes. The pixels come
from :func:`ssl_mt.data.synthetic.scene.render_scene`.
"""

from __future__ import annotations

import csv
import multiprocessing
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np
from tqdm import tqdm

from ssl_mt.data.image_io import write_png
from ssl_mt.data.manifest import MANIFEST_NAME
from ssl_mt.data.synthetic.person import SCALP, SKIN
from ssl_mt.data.synthetic.scene import apply_blur, render_scene

TONE_CLASSES = tuple(f"monk_{i:02d}" for i in range(1, 11))
BLUR_CLASSES = ("sharp", "slight", "strong")
RELEVANCE_CLASSES = ("irrelevant", "relevant")
COLUMNS = ("image", "split", "skin_mask", "scalp_mask", "blur", "tone", "relevance")
LABEL_COLUMNS = COLUMNS[2:]
JPEG_QUALITY = 95


@dataclass(frozen=True)
class _Settings:
    out: Path
    size: int
    seed: int
    irrelevant_fraction: float
    unlabeled_fraction: float
    val_fraction: float
    test_fraction: float
    unlabeled_images: float
    digits: int


def generate_dataset(
    out: str | Path,
    n: int,
    size: int = 256,
    seed: int = 0,
    irrelevant_fraction: float = 0.15,
    unlabeled_fraction: float = 0.2,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    unlabeled_images: float = 0.0,
    workers: int = 0,
    progress: bool = True,
) -> Path:
    """Writes a synthetic dataset: ``out/labels.csv``, ``out/images/``, ``out/masks/``.

    Args:
        out: Dataset root to write (created if needed).
        n: Number of images.
        size: Side of the square images in pixels.
        seed: Random seed; the same seed gives byte-identical files.
        irrelevant_fraction: Share of images without a person (relevance ``irrelevant``,
            no skin/scalp mask, no tone).
        unlabeled_fraction: Share of label cells left empty, drawn independently per task.
        val_fraction: Share of images in the ``val`` split.
        test_fraction: Share of images in the ``test`` split (the rest is ``train``): the
            images a checkpoint chosen on ``val`` is judged on (``python -m ssl_mt.compare``).
        unlabeled_images: Share of the ``train`` images with no label at all (every label
            cell empty): images only self-supervised pretraining can use, as in a real
            collection where few photos are annotated. ``val`` stays labeled.
        workers: Worker processes (0 = one per CPU core, 1 = in this process). They are
            spawned, so a script calling this needs the ``if __name__ == "__main__":``
            guard, as with DataLoader workers.
        progress: Show a progress bar.

    Returns:
        ``out``.

    Raises:
        ValueError: An argument is out of range; the message names it.
    """
    _validate(
        n,
        size,
        irrelevant_fraction,
        unlabeled_fraction,
        val_fraction,
        test_fraction,
        unlabeled_images,
        workers,
    )
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    settings = _Settings(
        out=out,
        size=size,
        seed=seed,
        irrelevant_fraction=irrelevant_fraction,
        unlabeled_fraction=unlabeled_fraction,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        unlabeled_images=unlabeled_images,
        digits=max(5, len(str(n - 1))),
    )
    rows = _parallel_map(
        partial(_write_sample, settings), range(n), workers, progress, desc="generate"
    )
    with open(out / MANIFEST_NAME, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return out


def _validate(
    n: int,
    size: int,
    irrelevant_fraction: float,
    unlabeled_fraction: float,
    val_fraction: float,
    test_fraction: float,
    unlabeled_images: float,
    workers: int,
) -> None:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels, got {size}")
    fractions = {
        "irrelevant_fraction": irrelevant_fraction,
        "unlabeled_fraction": unlabeled_fraction,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "unlabeled_images": unlabeled_images,
    }
    for name, value in fractions.items():
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1 (no train image left), got "
            f"{val_fraction} + {test_fraction}"
        )
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0 = one per CPU core), got {workers}")


T = TypeVar("T")
R = TypeVar("R")


def _parallel_map(
    fn: Callable[[T], R], items: Iterable[T], workers: int, progress: bool, desc: str
) -> list[R]:
    """``[fn(x) for x in items]`` in order, over a spawned process pool, with a progress bar."""
    items = list(items)
    workers = min(workers or os.cpu_count() or 1, len(items))
    bar = tqdm(total=len(items), desc=desc, unit="img", disable=not progress)
    with bar:
        if workers <= 1:
            return [_tick(bar, fn(x)) for x in items]
        # spawn, not fork: the caller may have torch/OpenMP threads running.
        context = multiprocessing.get_context("spawn")
        chunksize = max(1, min(32, len(items) // (workers * 8)))
        with context.Pool(workers) as pool:
            return [_tick(bar, r) for r in pool.imap(fn, items, chunksize=chunksize)]


def _tick(bar: tqdm, result: R) -> R:
    bar.update(1)
    return result


def _write_sample(settings: _Settings, index: int) -> dict[str, str]:
    """Draws image ``index``, writes its files and returns its csv row."""
    rng = np.random.default_rng([settings.seed, index])
    # Every label decision is drawn first, in a fixed order, so it never depends on content.
    relevant = bool(rng.random() >= settings.irrelevant_fraction)
    blur = BLUR_CLASSES[int(rng.integers(len(BLUR_CLASSES)))]
    # One draw decides the split, so the other decisions do not depend on the fractions.
    draw = rng.random()
    if draw < settings.val_fraction:
        split = "val"
    elif draw < settings.val_fraction + settings.test_fraction:
        split = "test"
    else:
        split = "train"
    unlabeled = dict(
        zip(
            LABEL_COLUMNS, rng.random(len(LABEL_COLUMNS)) < settings.unlabeled_fraction, strict=True
        )
    )
    tone = int(rng.integers(len(TONE_CLASSES)))
    image_only = split == "train" and bool(rng.random() < settings.unlabeled_images)
    if image_only:
        unlabeled = dict.fromkeys(LABEL_COLUMNS, True)

    image, labels = render_scene(rng, settings.size, tone if relevant else None)
    image = apply_blur(rng, image, blur)

    stem = f"{index:0{settings.digits}d}"
    row = dict.fromkeys(COLUMNS, "")
    row["image"] = f"images/{stem}.jpg"
    row["split"] = split
    _write_jpeg(settings.out / row["image"], image)
    if relevant:
        for column, code, suffix in (("skin_mask", SKIN, "skin"), ("scalp_mask", SCALP, "scalp")):
            if not unlabeled[column]:
                row[column] = f"masks/{stem}_{suffix}.png"
                write_png(
                    settings.out / row[column], np.where(labels == code, 255, 0).astype(np.uint8)
                )
        row["tone"] = TONE_CLASSES[tone]
    row["blur"] = blur
    row["relevance"] = RELEVANCE_CLASSES[int(relevant)]
    for column in ("blur", "tone", "relevance"):
        if unlabeled[column]:
            row[column] = ""
    return row


def _write_jpeg(path: Path, rgb: np.ndarray) -> None:
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
        raise OSError(f"could not write {path}")
