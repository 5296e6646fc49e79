"""Synthetic portrait dataset in the manifest format, for tests, demos and benchmarks.

Each image is a cluttered background with, for most images, a head: a face whose skin has
one of the 10 Monk skin tone colours (with a lighting gradient and texture), eyes, brows,
a mouth, ears, a neck, clothing and hair with a visible scalp (a parting, a thinning crown
or a receding top). The scene is drawn as a label map first, then coloured, so the skin and
scalp masks agree with the pixels exactly. A blur level (sharp / slight / strong) is applied
to the final image, irrelevant images (no person) are mixed in, and a share of the label
cells is left empty per task, as in partially annotated real data.

Every image has its own random generator ``np.random.default_rng([seed, index])``: the same
seed writes byte-identical files whatever the number of worker processes.
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

# Monk Skin Tone scale (Monk 2019, https://skintone.google), lightest to darkest.
MONK_HEX = (
    "#f6ede4",
    "#f3e7db",
    "#f7ead0",
    "#eadaba",
    "#d7bd96",
    "#a07e56",
    "#825c43",
    "#604134",
    "#3a312a",
    "#292420",
)
MONK_RGB = np.array([[int(h[i : i + 2], 16) for i in (1, 3, 5)] for h in MONK_HEX], np.float32)
TONE_CLASSES = tuple(f"monk_{i:02d}" for i in range(1, 11))
BLUR_CLASSES = ("sharp", "slight", "strong")
RELEVANCE_CLASSES = ("irrelevant", "relevant")
COLUMNS = ("image", "split", "skin_mask", "scalp_mask", "blur", "tone", "relevance")
LABEL_COLUMNS = COLUMNS[2:]
JPEG_QUALITY = 95

# Blur sigma ranges in pixels at 256 px; scaled linearly with the image size. Training
# resizes images down (a 96 px image to 64 px, a crop of it to the training size), which
# shrinks sigma with the image: "slight" must stay above ~0.7 px after that, or it cannot
# be told from "sharp" (the resize interpolation itself blurs by about half a pixel).
BLUR_SIGMA = {"slight": (3.0, 4.0), "strong": (7.0, 9.0)}
# Hair darker or lighter than the skin by at least this much luma (0-255): a scalp that
# shows through hair of its own colour is invisible, whatever a mask says.
MIN_HAIR_CONTRAST = 45.0
# Strands across the scalp-noise range u in [-1.5, 1.5] (face half axes): 24 makes a strand
# ~2 px wide at 96 px (the hair texture keeps 96, finer than a pixel there).
SCALP_STRANDS = 24

HAIR_RGB = np.array(
    [
        [20, 16, 14],  # black
        [45, 30, 22],  # dark brown
        [90, 60, 35],  # brown
        [150, 110, 60],  # light brown
        [205, 170, 110],  # blonde
        [130, 55, 30],  # auburn
        [160, 160, 158],  # grey
    ],
    np.float32,
)
IRIS_RGB = np.array([[60, 40, 25], [90, 60, 30], [60, 90, 130], [70, 100, 60]], np.float32)

# Label map codes: the drawing order is the z-order.
BG, SKIN, HAIR, SCALP, EYE, IRIS, MOUTH, BROW, CLOTH = range(9)


@dataclass(frozen=True)
class _Settings:
    out: Path
    size: int
    seed: int
    irrelevant_fraction: float
    unlabeled_fraction: float
    val_fraction: float
    unlabeled_images: float
    digits: int


@dataclass(frozen=True)
class _Head:
    """A head in image coordinates: centre, half axes of the face ellipse, rotation."""

    cx: float
    cy: float
    a: float
    b: float
    angle: float


def generate_dataset(
    out: str | Path,
    n: int,
    size: int = 256,
    seed: int = 0,
    irrelevant_fraction: float = 0.15,
    unlabeled_fraction: float = 0.2,
    val_fraction: float = 0.15,
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
        val_fraction: Share of images in the ``val`` split (the rest is ``train``).
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
        n, size, irrelevant_fraction, unlabeled_fraction, val_fraction, unlabeled_images, workers
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
        "unlabeled_images": unlabeled_images,
    }
    for name, value in fractions.items():
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
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
    split = "val" if rng.random() < settings.val_fraction else "train"
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


def apply_blur(rng: np.random.Generator, image: np.ndarray, level: str) -> np.ndarray:
    """Gaussian blur of one of the ``BLUR_CLASSES`` levels, sigma scaled to the image size."""
    if level == "sharp":
        return image
    low, high = BLUR_SIGMA[level]
    sigma = float(rng.uniform(low, high)) * image.shape[0] / 256
    return cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, sigmaY=sigma)


def render_scene(
    rng: np.random.Generator, size: int, tone: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Draws one scene.

    Args:
        rng: The image's random generator.
        size: Side in pixels.
        tone: Monk tone index (0-9) of the person, or None for a scene without a person.

    Returns:
        The RGB uint8 image (size, size, 3) and the label map (size, size) with the codes
        ``BG``, ``SKIN``, ``HAIR``, ``SCALP``, ... of this module.
    """
    image = _background(rng, size)
    _clutter(
        rng, image, count=int(rng.integers(4, 10) if tone is not None else rng.integers(7, 15))
    )
    image = image.astype(np.float32)
    labels = np.zeros((size, size), np.uint8)
    if tone is not None:
        head = _random_head(rng, size)
        labels = _head_labels(rng, head, size)
        _paint_person(rng, image, labels, head, MONK_RGB[tone])
    noise = rng.normal(0.0, 2.0, image.shape).astype(np.float32)
    image = np.clip(image + noise, 0, 255).astype(np.uint8)
    return image, labels


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A linear gradient between two random colours plus low-frequency blotches (uint8)."""
    c0, c1 = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    t = np.cos(theta) * ramp[None, :] + np.sin(theta) * ramp[:, None]
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    image = c0 + (c1 - c0) * t[..., None]
    blotches = rng.normal(0.0, 12.0, (6, 6, 3)).astype(np.float32)
    image += cv2.resize(blotches, (size, size), interpolation=cv2.INTER_CUBIC)
    return np.clip(image, 0, 255).astype(np.uint8)


def _clutter(rng: np.random.Generator, image: np.ndarray, count: int) -> None:
    """Random rectangles, circles, ellipses, polygons and lines, drawn in place (uint8)."""
    size = image.shape[0]
    for _ in range(count):
        kind = int(rng.integers(5))
        colour = _random_colour(rng)
        p = rng.uniform(-0.1, 1.1, 2) * size
        extent = rng.uniform(0.04, 0.3) * size
        centre = (int(p[0]), int(p[1]))
        if kind == 0:
            box = cv2.boxPoints(
                ((p[0], p[1]), (extent * 2, extent * rng.uniform(0.3, 2)), rng.uniform(0, 180))
            )
            cv2.fillPoly(image, [box.astype(np.int32)], colour)
        elif kind == 1:
            cv2.circle(image, centre, int(extent), colour, -1, cv2.LINE_AA)
        elif kind == 2:
            axes = (int(extent), int(extent * rng.uniform(0.2, 1.0)))
            cv2.ellipse(image, centre, axes, rng.uniform(0, 180), 0, 360, colour, -1, cv2.LINE_AA)
        elif kind == 3:
            points = p + rng.uniform(-extent, extent, (int(rng.integers(3, 7)), 2))
            cv2.fillPoly(image, [points.astype(np.int32)], colour, cv2.LINE_AA)
        else:
            end = p + rng.uniform(-0.6, 0.6, 2) * size
            thickness = max(1, int(rng.uniform(0.004, 0.02) * size))
            cv2.line(image, centre, (int(end[0]), int(end[1])), colour, thickness, cv2.LINE_AA)


def _random_colour(rng: np.random.Generator) -> tuple[float, float, float]:
    if rng.random() < 0.15:  # a skin-coloured distractor: colour alone must not mean "person"
        base = MONK_RGB[int(rng.integers(len(MONK_RGB)))] * rng.uniform(0.85, 1.1)
        return tuple(float(c) for c in np.clip(base, 0, 255))
    return tuple(float(c) for c in rng.uniform(0, 255, 3))


def _random_head(rng: np.random.Generator, size: int) -> _Head:
    a = rng.uniform(0.15, 0.23) * size
    b = a * rng.uniform(1.2, 1.35)
    cx = rng.uniform(0.5 * size - 0.15 * size, 0.5 * size + 0.15 * size)
    top = 1.15 * b + 0.03 * size  # keep the top of the hair inside the image
    cy = rng.uniform(top, max(top, 0.62 * size))
    return _Head(cx=cx, cy=cy, a=a, b=b, angle=float(rng.uniform(-0.25, 0.25)))


def _local_coords(head: _Head, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates in the head frame, in units of the face half axes (u: right, v: down)."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = xs - head.cx, ys - head.cy
    cos, sin = np.cos(head.angle), np.sin(head.angle)
    u = (dx * cos + dy * sin) / head.a
    v = (-dx * sin + dy * cos) / head.b
    return u, v


def _ellipse(
    u: np.ndarray, v: np.ndarray, u0: float, v0: float, ru: float, rv: float
) -> np.ndarray:
    return ((u - u0) / ru) ** 2 + ((v - v0) / rv) ** 2 <= 1.0


def _head_labels(rng: np.random.Generator, head: _Head, size: int) -> np.ndarray:
    """The label map of a person, drawn back to front."""
    u, v = _local_coords(head, size)
    labels = np.zeros((size, size), np.uint8)
    if rng.random() < 0.4:  # long hair falling behind the face
        labels[_ellipse(u, v, 0, 0.25, 1.3, 1.25) & (v > -0.2)] = HAIR
    labels[(np.abs(u) < 0.42) & (v > 0.6) & (v < 2.0)] = SKIN  # neck
    labels[_ellipse(u, v, 0, 2.4, 2.4, 1.05)] = CLOTH
    for side in (-1, 1):
        labels[_ellipse(u, v, side * 0.97, -0.02, 0.17, 0.27)] = SKIN  # ears
    labels[_ellipse(u, v, 0, 0, 1, 1)] = SKIN
    cap = _hair_cap(rng, u, v)
    labels[cap] = HAIR
    labels[_scalp(rng, u, v, cap, head)] = SCALP
    eye_v = rng.uniform(-0.16, -0.08)
    iris_shift = rng.uniform(-0.05, 0.05)
    for side in (-1, 1):
        eye = _ellipse(u, v, side * 0.38, eye_v, 0.16, 0.075)
        labels[_ellipse(u, v, side * 0.38, eye_v - 0.17, 0.2, 0.04)] = BROW
        labels[eye] = EYE
        labels[eye & _ellipse(u, v, side * 0.38 + iris_shift, eye_v, 0.075, 0.07)] = IRIS
    labels[_ellipse(u, v, 0, rng.uniform(0.45, 0.58), rng.uniform(0.22, 0.32), 0.06)] = MOUTH
    return labels


def _hair_cap(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Hair over the top of the head, down to a hairline that drops towards the temples."""
    receding = rng.random() < 0.25
    h0 = rng.uniform(-0.78, -0.62) if receding else rng.uniform(-0.55, -0.38)
    h1 = rng.uniform(0.4, 0.7)
    hairline = h0 + h1 * u**4
    return _ellipse(u, v, 0, -0.06, rng.uniform(1.05, 1.12), rng.uniform(1.04, 1.1)) & (
        v < hairline
    )


def _scalp(
    rng: np.random.Generator, u: np.ndarray, v: np.ndarray, cap: np.ndarray, head: _Head
) -> np.ndarray:
    """Where skin shows through the hair: a parting, a thinning crown or a bald top.

    Sizes are in units of the face half axes with a floor in pixels, and the strands that
    cross a patch are at least ~2 px wide (``SCALP_STRANDS`` across the head), so the
    region stays a learnable shape at 64-96 px instead of sub-pixel speckle.
    """
    style = int(rng.integers(3))
    strands = _strand_noise(rng, u, v, bins=SCALP_STRANDS)
    if style == 0:  # parting, at least ~3 px wide
        centre = rng.uniform(-0.4, 0.4)
        half_width = max(rng.uniform(0.07, 0.11), 1.5 / head.a)
        slope = rng.uniform(-0.15, 0.15)
        scalp = cap & (np.abs(u - centre - slope * (v + 0.6)) < half_width)
    elif style == 1:  # thinning crown: the scalp shows between a few strands
        patch = _ellipse(
            u, v, rng.uniform(-0.2, 0.2), -0.8, rng.uniform(0.4, 0.6), rng.uniform(0.2, 0.3)
        )
        core = _ellipse(u, v, 0, -0.8, 0.25, 0.12)
        scalp = cap & ((patch & (strands > rng.uniform(0.15, 0.3))) | core)
    else:  # bald top with sparse hair
        patch = _ellipse(u, v, 0, -1.0, rng.uniform(0.55, 0.8), rng.uniform(0.3, 0.45))
        scalp = cap & patch & (strands > 0.1)
    if not scalp.any():  # tiny images: keep at least the top of the head visible
        scalp = cap & _ellipse(u, v, 0, -0.95, 0.4, 0.15)
    if not scalp.any() and cap.any():
        scalp = np.zeros_like(cap)
        top = np.argmin(np.where(cap, v, np.inf))
        scalp.flat[top] = True
    return scalp


def _strand_noise(
    rng: np.random.Generator, u: np.ndarray, v: np.ndarray, bins: int = 96
) -> np.ndarray:
    """Values in [0, 1) that vary fast across strands (u: ``bins`` strands over the
    head's width and more) and slowly along them (v)."""
    across = rng.random(bins).astype(np.float32)
    along = rng.random(8).astype(np.float32)
    iu = np.clip((u + 1.5) / 3.0 * (bins - 1), 0, bins - 1).astype(np.int32)
    iv = np.clip((v + 1.5) / 3.0 * 7, 0, 7).astype(np.int32)
    return (across[iu] * 0.8 + along[iv] * 0.2) % 1.0


def _luma(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114], np.float32))


def _hair_colour(rng: np.random.Generator, skin: np.ndarray) -> np.ndarray:
    """A hair colour at least ``MIN_HAIR_CONTRAST`` luma away from the skin (the scalp is
    skin-coloured, so this is what makes it visible)."""
    contrasted = [h for h in HAIR_RGB if abs(_luma(h) - _luma(skin)) >= MIN_HAIR_CONTRAST]
    choices = contrasted or list(HAIR_RGB)
    return choices[int(rng.integers(len(choices)))]


def _paint_person(
    rng: np.random.Generator, image: np.ndarray, labels: np.ndarray, head: _Head, skin: np.ndarray
) -> None:
    """Colours the person's labels into ``image`` (float32, in place)."""
    size = image.shape[0]
    u, v = _local_coords(head, size)
    # A zero-mean lighting gradient keeps the mean skin colour at the Monk colour.
    direction = rng.normal(size=2)
    direction /= np.linalg.norm(direction) + 1e-6
    strength = rng.uniform(0.03, 0.09)
    light = 1.0 + strength * (direction[0] * u + direction[1] * v)
    mottling = cv2.resize(
        rng.normal(0, 0.025, (5, 5)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC
    )
    grain = rng.normal(0, 0.025, (size, size)).astype(np.float32)
    skin_shade = (light + mottling + grain)[..., None]
    is_skin = (labels == SKIN) | (labels == SCALP)
    image[is_skin] = (skin * skin_shade)[is_skin]

    hair = _hair_colour(rng, skin)
    strands = 0.7 + 0.6 * _strand_noise(rng, u, v)
    is_hair = (labels == HAIR) | (labels == BROW)
    image[is_hair] = (hair * (strands * light)[..., None])[is_hair]

    cloth = np.array(_random_colour(rng), np.float32)
    image[labels == CLOTH] = (cloth * light[..., None])[labels == CLOTH]
    image[labels == EYE] = np.array([235, 232, 225], np.float32)
    image[labels == IRIS] = IRIS_RGB[int(rng.integers(len(IRIS_RGB)))]
    lips = skin * np.array([0.78, 0.55, 0.55], np.float32) + np.array([40, 0, 5], np.float32)
    image[labels == MOUTH] = lips
    np.clip(image, 0, 255, out=image)
