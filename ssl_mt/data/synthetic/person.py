"""A person's label map: head, neck, ears, clothing, face features, hair and scalp.

The map is drawn back to front in the head's own frame (units of the face half axes), so
every pixel has exactly one code and the masks agree with the painted pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Strands across the scalp-noise range u in [-1.5, 1.5] (face half axes): 24 makes a strand
# ~2 px wide at 96 px (the hair texture keeps 96, finer than a pixel there).
SCALP_STRANDS = 24

# Label map codes: the drawing order is the z-order.
BG, SKIN, HAIR, SCALP, EYE, IRIS, MOUTH, BROW, CLOTH = range(9)


@dataclass(frozen=True)
class _Head:
    """A head in image coordinates: centre, half axes of the face ellipse, rotation."""

    cx: float
    cy: float
    a: float
    b: float
    angle: float


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
