"""Augmentation pipelines: masks follow the image, presets keep what they promise to keep."""

from __future__ import annotations

import math

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from albumentations.pytorch import ToTensorV2
from omegaconf import DictConfig

from ssl_mt.config import load_group
from ssl_mt.data.transforms import (
    RandomResizedCrop,
    build_finetune_transform,
    build_ssl_view_transform,
)

SEEDS = range(100)


def augment_config(name: str) -> DictConfig:
    return load_group("augment", name)


def to_rgb(tensor: torch.Tensor, cfg) -> np.ndarray:
    """Undoes ``Normalize`` + ``ToTensorV2``: (3,H,W) float -> (H,W,3) float in 0..255."""
    assert tensor.dtype == torch.float32
    mean, std = np.array(cfg["mean"]), np.array(cfg["std"])
    return (tensor.numpy().transpose(1, 2, 0) * std + mean) * 255.0


def f_shape(height: int, width: int) -> np.ndarray:
    """A filled letter F: no mirror or rotation symmetry, so any mismatch shows."""
    mask = np.zeros((height, width), np.uint8)

    def y(f: float) -> int:
        return int(f * height)

    def x(f: float) -> int:
        return int(f * width)

    mask[y(0.1) : y(0.9), x(0.1) : x(0.35)] = 1
    mask[y(0.1) : y(0.3), x(0.35) : x(0.85)] = 1
    mask[y(0.45) : y(0.62), x(0.35) : x(0.65)] = 1
    return mask


def corner(height: int, width: int) -> np.ndarray:
    """A right triangle in the lower-right corner, with a hole: no symmetry either."""
    yy, xx = np.mgrid[:height, :width] + 0.5
    mask = xx / width + yy / height > 1.1
    hole = (np.abs(xx / width - 0.8) < 0.08) & (np.abs(yy / height - 0.75) < 0.08)
    return (mask & ~hole).astype(np.uint8)


def painted(masks: list[np.ndarray]) -> np.ndarray:
    """An RGB image whose red channel is 255 exactly on masks[0], green on masks[1]."""
    image = np.zeros((*masks[0].shape, 3), np.uint8)
    for channel, mask in enumerate(masks):
        image[..., channel] = 255 * mask
    image[..., 2] = 90
    return image


def iou(a: np.ndarray, b: np.ndarray) -> float | None:
    union = (a | b).sum()
    return None if union == 0 else float((a & b).sum() / union)


def check_alignment(outputs, cfg, n_masks: int) -> None:
    """Each painted channel, thresholded, matches its transformed mask.

    Resampling the image (bilinear) and the mask (nearest) differ by at most about a pixel
    along the borders, so single draws of small shapes are held to IoU > 0.88, the average to
    > 0.95; a systematic sub-pixel shift is caught by the mean centroid offset.
    """
    scores: list[list[float]] = [[] for _ in range(n_masks)]
    offsets: list[tuple[float, float]] = []
    for out in outputs:
        rgb = to_rgb(out["image"], cfg)
        for k in range(n_masks):
            mask = np.asarray(out["masks"][k])
            assert mask.shape == rgb.shape[:2]
            assert set(np.unique(mask)) <= {0, 1}
            painted_k = rgb[..., k] > 127.5
            score = iou(painted_k, mask > 0)
            if score is None:
                continue
            scores[k].append(score)
            if k == 0 and painted_k.any() and mask.any():
                (ya, xa), (yb, xb) = np.nonzero(painted_k), np.nonzero(mask)
                offsets.append((ya.mean() - yb.mean(), xa.mean() - xb.mean()))
    for k in range(n_masks):
        assert len(scores[k]) > 0.8 * len(outputs)
        assert min(scores[k]) > 0.88, (k, sorted(scores[k])[:5])
        assert np.mean(scores[k]) > 0.95, (k, np.mean(scores[k]))
    dy, dx = np.mean(offsets, axis=0)
    assert abs(dy) < 0.2 and abs(dx) < 0.2, (dy, dx)


# --------------------------------------------------------------------------- fine-tuning


@pytest.mark.parametrize(("height", "width", "size"), [(60, 80, 64), (96, 72, 48), (40, 40, 32)])
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_masks_follow_every_geometric_augmentation(
    height: int, width: int, size: int, strength: float
) -> None:
    cfg = augment_config("finetune")
    masks = [f_shape(height, width), corner(height, width)]
    image = painted(masks)
    transform = build_finetune_transform(cfg, size, train=True, strength=strength)
    outputs = []
    for seed in SEEDS:
        transform.set_random_seed(seed)
        out = transform(image=image, masks=masks)
        assert out["image"].shape == (3, size, size)
        outputs.append(out)
    check_alignment(outputs, cfg, n_masks=2)
    # The augmentation did something: the red channel is not always the same.
    reds = {to_rgb(o["image"], cfg)[..., 0].round().tobytes() for o in outputs[:20]}
    assert len(reds) > 10


def test_geometric_extras_move_the_masks_too() -> None:
    cfg = augment_config("finetune")
    cfg.extra = [{"_target_": "albumentations.VerticalFlip", "p": 1.0}]
    plain = build_finetune_transform(augment_config("finetune"), 48, train=True)
    flipped = build_finetune_transform(cfg, 48, train=True)
    assert isinstance(flipped.transforms[-3], A.VerticalFlip)
    masks = [f_shape(50, 60)]
    image = painted(masks)
    outputs = []
    for seed in range(30):
        plain.set_random_seed(seed)
        flipped.set_random_seed(seed)
        a = plain(image=image, masks=masks)
        b = flipped(image=image, masks=masks)
        assert torch.equal(b["image"], a["image"].flip(1))
        assert np.array_equal(np.asarray(b["masks"][0]), np.asarray(a["masks"][0])[::-1])
        outputs.append(b)
    check_alignment(outputs, cfg, n_masks=1)


def test_eval_transform_is_deterministic_and_square() -> None:
    cfg = augment_config("finetune")
    masks = [f_shape(50, 90)]
    image = painted(masks)
    transform = build_finetune_transform(cfg, 40, train=False)
    outputs = []
    for seed in (0, 1, 12345):
        transform.set_random_seed(seed)
        outputs.append(transform(image=image, masks=masks))
    for out in outputs:
        assert out["image"].shape == (3, 40, 40)
        assert np.asarray(out["masks"][0]).shape == (40, 40)
        assert torch.equal(out["image"], outputs[0]["image"])
        assert np.array_equal(np.asarray(out["masks"][0]), np.asarray(outputs[0]["masks"][0]))
    # A plain resize: same as resizing the image ourselves.
    expected = cv2.resize(image, (40, 40), interpolation=cv2.INTER_LINEAR)
    assert np.abs(to_rgb(outputs[0]["image"], cfg) - expected).max() < 1.0
    check_alignment(outputs, cfg, n_masks=1)
    assert [type(t) for t in transform.transforms] == [A.Resize, A.Normalize, ToTensorV2]


def test_strength_zero_is_crop_and_flip_only() -> None:
    cfg = augment_config("finetune")
    transform = build_finetune_transform(cfg, 32, train=True, strength=0.0)
    kinds = [type(t) for t in transform.transforms]
    assert kinds == [RandomResizedCrop, A.HorizontalFlip, A.Normalize, ToTensorV2]
    assert tuple(transform.transforms[0].scale) == (1.0, 1.0)

    # Whole square image, resized and possibly mirrored: nothing else.
    masks = [f_shape(32, 32)]
    image = painted(masks)
    seen = set()
    for seed in range(20):
        transform.set_random_seed(seed)
        out = transform(image=image, masks=masks)
        mask = np.asarray(out["masks"][0])
        flipped = np.array_equal(mask, masks[0][:, ::-1])
        assert flipped or np.array_equal(mask, masks[0])
        seen.add(flipped)
        expected = image[:, ::-1] if flipped else image
        assert np.abs(to_rgb(out["image"], cfg) - expected).max() < 1.0
    assert seen == {True, False}


def test_strength_scales_the_magnitudes() -> None:
    cfg = augment_config("finetune")
    full = build_finetune_transform(cfg, 32, train=True, strength=1.0)
    half = build_finetune_transform(cfg, 32, train=True, strength=0.5)
    crop_full, crop_half = full.transforms[0], half.transforms[0]
    assert crop_full.scale[0] == pytest.approx(cfg.crop_scale[0])
    assert crop_half.scale[0] == pytest.approx(1 - 0.5 * (1 - cfg.crop_scale[0]))
    affine_full = next(t for t in full.transforms if isinstance(t, A.Affine))
    affine_half = next(t for t in half.transforms if isinstance(t, A.Affine))
    assert tuple(affine_full.rotate) == pytest.approx((-15.0, 15.0))
    assert tuple(affine_half.rotate) == pytest.approx((-7.5, 7.5))


def test_negative_strength_raises() -> None:
    with pytest.raises(ValueError, match="strength must be >= 0"):
        build_finetune_transform(augment_config("finetune"), 32, train=True, strength=-0.1)


def test_finetune_augmentation_is_geometric_only() -> None:
    """Tone and blur labels must stay true: a flat colour stays that colour and sharp."""
    cfg = augment_config("finetune")
    transform = build_finetune_transform(cfg, 32, train=True)
    colour = np.array([170, 120, 95], np.uint8)
    image = np.broadcast_to(colour, (40, 40, 3)).copy()
    for seed in range(20):
        transform.set_random_seed(seed)
        out = transform(image=image, masks=[np.ones((40, 40), np.uint8)])
        rgb = to_rgb(out["image"], cfg)
        # Affine fills its border with black: skip it and the blended pixels along it.
        filled = np.asarray(out["masks"][0]).astype(np.uint8)
        inside = rgb[cv2.erode(filled, np.ones((3, 3), np.uint8), borderValue=0) > 0]
        assert len(inside) > 0.4 * 32 * 32
        assert np.abs(inside - colour).max() < 1.5


# --------------------------------------------------------------------------- SSL presets


def stripes(size: int = 64, width: int = 8) -> np.ndarray:
    """Vertical stripes of two skin tones: sharp edges, hue about 22 degrees."""
    image = np.zeros((size, size, 3), np.uint8)
    for x in range(size):
        image[:, x] = (180, 130, 100) if (x // width) % 2 == 0 else (120, 75, 50)
    return image


def mean_hue(rgb: np.ndarray) -> float:
    colour = (rgb.reshape(-1, 3).mean(axis=0) / 255.0).astype(np.float32)
    return float(cv2.cvtColor(colour[None, None], cv2.COLOR_RGB2HSV)[0, 0, 0])  # degrees


def chroma(rgb: np.ndarray) -> float:
    """Mean spread between the channels of a pixel: 0 for a gray image."""
    return float((rgb.max(axis=2) - rgb.min(axis=2)).mean())


def sharpness(rgb: np.ndarray) -> float:
    """Steepest horizontal step per row relative to the row's range (median over rows).

    Upscaling a crop by at most ~2.6x (``skin``) keeps it above 0.4; a Gaussian blur of a
    few pixels brings it near 0.2. Brightness and contrast changes cancel out.
    """
    luma = rgb.mean(axis=2)
    step = np.abs(np.diff(luma, axis=1)).max(axis=1)
    span = np.maximum(luma.max(axis=1) - luma.min(axis=1), 1e-6)
    return float(np.median(step / span))


def ssl_draws(cfg, n: int = 50, size: int = 64) -> list[np.ndarray]:
    transform = build_ssl_view_transform(cfg, size)
    image = stripes()
    out = []
    for seed in range(n):
        transform.set_random_seed(seed)
        view = transform(image=image)["image"]
        assert view.shape == (3, size, size)
        out.append(to_rgb(view, cfg))
    return out


def test_skin_preset_keeps_colour_and_sharpness() -> None:
    cfg = augment_config("skin")
    reference = mean_hue(stripes().astype(np.float64))
    draws = ssl_draws(cfg)
    hues = [mean_hue(rgb) for rgb in draws]
    assert max(abs(h - reference) for h in hues) < 4.0, hues
    assert min(chroma(rgb) for rgb in draws) > 20.0  # never gray
    assert min(sharpness(rgb) for rgb in draws) > 0.3  # never blurred
    # ... yet the views do vary (crop, flip, brightness/contrast).
    assert len({rgb.round().tobytes() for rgb in draws}) == len(draws)
    kinds = {type(t) for t in build_ssl_view_transform(cfg, 32).transforms}
    assert A.ToGray not in kinds
    assert A.GaussianBlur not in kinds


def test_simclr_preset_changes_colour_and_blurs() -> None:
    cfg = augment_config("simclr")
    reference = mean_hue(stripes().astype(np.float64))
    n = 200
    draws = ssl_draws(cfg, n=n)
    gray = [rgb for rgb in draws if chroma(rgb) < 2.0]
    coloured = [rgb for rgb in draws if chroma(rgb) >= 2.0]
    # Binomial(n, p): within 3 sigma of n * p (22-58 of 200 at p = 0.2), so a grayscale of
    # p = 0.1 or 0.5 (or always, never) fails.
    p = float(cfg.grayscale)
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(len(gray) - n * p) <= 3 * sigma, (len(gray), n * p, sigma)
    hue_shift = [
        min(abs(mean_hue(rgb) - reference), 360 - abs(mean_hue(rgb) - reference))
        for rgb in coloured
    ]
    assert sum(shift > 10.0 for shift in hue_shift) >= 5
    assert sum(sharpness(rgb) < 0.3 for rgb in draws) >= 3


def test_sharpness_measure_sees_the_blur() -> None:
    """Control for the test above: the blur alone, with skin-like crops, is detected."""
    cfg = augment_config("simclr")
    cfg.crop_scale = [0.2, 1.0]
    cfg.color_jitter.p = 0.0
    cfg.grayscale = 0.0
    values = [sharpness(rgb) for rgb in ssl_draws(cfg)]
    assert sum(v < 0.3 for v in values) >= 5
    cfg.gaussian_blur.p = 0.0
    assert min(sharpness(rgb) for rgb in ssl_draws(cfg)) > 0.3


def test_ssl_view_is_seeded() -> None:
    cfg = augment_config("simclr")
    transform = build_ssl_view_transform(cfg, 32)
    image = stripes()
    transform.set_random_seed(7)
    first = transform(image=image)["image"]
    transform.set_random_seed(7)
    assert torch.equal(transform(image=image)["image"], first)
    transform.set_random_seed(8)
    assert not torch.equal(transform(image=image)["image"], first)
