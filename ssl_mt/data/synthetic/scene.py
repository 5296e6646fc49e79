"""Rendering one synthetic scene: background, clutter, the painted person, noise and blur."""

from __future__ import annotations

import cv2
import numpy as np

from ssl_mt.data.synthetic.person import (
    BROW,
    CLOTH,
    EYE,
    HAIR,
    IRIS,
    MOUTH,
    SCALP,
    SKIN,
    _Head,
    _head_labels,
    _local_coords,
    _random_head,
    _strand_noise,
)

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

# Blur sigma ranges in pixels at 256 px; scaled linearly with the image size. Training
# resizes images down (a 96 px image to 64 px, a crop of it to the training size), which
# shrinks sigma with the image: "slight" must stay above ~0.7 px after that, or it cannot
# be told from "sharp" (the resize interpolation itself blurs by about half a pixel).
BLUR_SIGMA = {"slight": (3.0, 4.0), "strong": (7.0, 9.0)}
# Hair darker or lighter than the skin by at least this much luma (0-255): a scalp that
# shows through hair of its own colour is invisible, whatever a mask says.
MIN_HAIR_CONTRAST = 45.0

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
