"""Albumentations pipelines built from the ``augment`` config group.

SSL views (``simclr``/``skin`` presets) and fine-tuning transforms (geometric, applied
jointly to the image and its masks). Sizes are arguments, not config, because progressive
resolution changes them between epochs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2
from hydra.utils import instantiate

# Nearest neighbour that samples pixel centres like the bilinear image resize does.
_MASK_RESIZE = cv2.INTER_NEAREST_EXACT


def _normalize(cfg: Mapping[str, Any]) -> list[A.BasicTransform]:
    return [A.Normalize(mean=tuple(cfg["mean"]), std=tuple(cfg["std"])), ToTensorV2()]


def _extra(cfg: Mapping[str, Any]) -> list[A.BasicTransform]:
    return [instantiate(node) for node in (cfg.get("extra") or [])]


def _blur_kernel(size: int, fraction: float) -> int:
    kernel = max(3, round(size * fraction))
    return kernel if kernel % 2 == 1 else kernel + 1


def build_ssl_view_transform(cfg: Mapping[str, Any], size: int) -> A.Compose:
    """One SimCLR view: crop, flip, photometric jitter, normalise, to tensor.

    Args:
        cfg: An ``augment`` config (``simclr`` or ``skin``).
        size: Output side in pixels (square).

    Returns:
        A pipeline mapping ``image=HxWx3 uint8`` to a normalised (3, size, size) tensor.
    """
    jitter = cfg["color_jitter"]
    blur = cfg["gaussian_blur"]
    ops: list[A.BasicTransform] = [
        A.RandomResizedCrop(
            size=(size, size), scale=tuple(cfg["crop_scale"]), ratio=tuple(cfg["crop_ratio"])
        ),
        A.HorizontalFlip(p=cfg["hflip"]),
    ]
    if jitter["p"] > 0:
        ops.append(
            A.ColorJitter(
                brightness=jitter["brightness"],
                contrast=jitter["contrast"],
                saturation=jitter["saturation"],
                hue=jitter["hue"],
                p=jitter["p"],
            )
        )
    if cfg["grayscale"] > 0:
        ops.append(A.ToGray(num_output_channels=3, p=cfg["grayscale"]))
    if blur["p"] > 0:
        kernel = _blur_kernel(size, blur["kernel_fraction"])
        ops.append(
            A.GaussianBlur(
                blur_limit=(kernel, kernel), sigma_limit=tuple(blur["sigma"]), p=blur["p"]
            )
        )
    return A.Compose([*ops, *_extra(cfg), *_normalize(cfg)])


def build_finetune_transform(
    cfg: Mapping[str, Any],
    size: int,
    train: bool,
    strength: float = 1.0,
) -> A.Compose:
    """Joint image + masks pipeline for fine-tuning and evaluation.

    Geometric operations only, so labels (tone, blur) stay true. Masks passed as
    ``masks=[...]`` move with the image and are resampled with nearest neighbour
    (``INTER_NEAREST_EXACT``: OpenCV's plain ``INTER_NEAREST`` resize is shifted by up to
    half a source pixel against the bilinear image, misaligning masks by whole output pixels).

    Args:
        cfg: The ``finetune`` augment config.
        size: Output side in pixels (square).
        train: Random geometric augmentation when True; a plain resize when False.
        strength: Multiplier of the augmentation magnitudes (0 = none, 1 = as configured).
    """
    if strength < 0:
        raise ValueError(f"augmentation strength must be >= 0, got {strength}")
    if not train:
        return A.Compose([A.Resize(size, size, mask_interpolation=_MASK_RESIZE), *_normalize(cfg)])
    low, high = cfg["crop_scale"]
    crop_low = min(1.0, 1.0 - strength * (1.0 - low))
    zoom_low, zoom_high = cfg["scale"]
    translate = cfg["translate"] * strength
    ops: list[A.BasicTransform] = [
        A.RandomResizedCrop(
            size=(size, size),
            scale=(crop_low, high),
            ratio=tuple(cfg["crop_ratio"]),
            mask_interpolation=_MASK_RESIZE,
        ),
        A.HorizontalFlip(p=cfg["hflip"]),
    ]
    if strength > 0:
        ops.append(
            A.Affine(
                rotate=(-cfg["rotate_degrees"] * strength, cfg["rotate_degrees"] * strength),
                translate_percent=(-translate, translate),
                scale=(1 - strength * (1 - zoom_low), 1 + strength * (zoom_high - 1)),
                border_mode=0,
                p=0.8,
            )
        )
    return A.Compose([*ops, *_extra(cfg), *_normalize(cfg)])
