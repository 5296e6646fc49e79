"""Albumentations pipelines built from the ``augment`` config group.

SSL views (``simclr``/``skin`` presets) and fine-tuning transforms (geometric, applied
jointly to the image and its masks). Sizes are arguments, not config, because progressive
resolution changes them between epochs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2
from hydra.utils import instantiate

from ssl_mt.data.decode_scale import RandomResizedCrop

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
        RandomResizedCrop(
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


@dataclass(frozen=True)
class ViewSpec:
    """The views an SSL method takes of each image: global crops, then local crops.

    Multi-crop (SwAV, https://arxiv.org/abs/2006.09882; DINO, https://arxiv.org/abs/2104.14294):
    ``global_crops`` views at the stage's size, then ``local_crops`` smaller views at
    :meth:`local_size`, each view a random resized crop of the given area range followed by
    the augment preset's flip and photometric operations.

    Attributes:
        global_crops: Views at the stage size (>= 1).
        local_crops: Views at the local size (>= 0).
        global_scale: Crop-area range of global views; None: the augment's ``crop_scale``.
        local_scale: Crop-area range of local views.
        local_size_ratio: Local side / global side (DINO: 96 / 224).
        local_size_multiple: The local side is rounded to a multiple of this.
    """

    global_crops: int = 2
    local_crops: int = 0
    global_scale: tuple[float, float] | None = None
    local_scale: tuple[float, float] = (0.05, 0.4)
    local_size_ratio: float = 96 / 224
    local_size_multiple: int = 8

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None, key: str = "method.views") -> ViewSpec:
        """Parses and checks a ``views`` config; errors name ``key`` and the bad entry."""
        cfg = dict(cfg or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"{key}: unknown key(s) {unknown}; known: {sorted(known)}")
        for name in ("global_scale", "local_scale"):
            if cfg.get(name) is not None:
                low, high = (float(v) for v in cfg[name])
                if not 0 < low <= high <= 1:
                    raise ValueError(
                        f"{key}.{name} must be 0 < low <= high <= 1, got {[low, high]}"
                    )
                cfg[name] = (low, high)
        spec = cls(**cfg)
        if spec.global_crops < 1:
            raise ValueError(f"{key}.global_crops must be >= 1, got {spec.global_crops}")
        if spec.local_crops < 0:
            raise ValueError(f"{key}.local_crops must be >= 0, got {spec.local_crops}")
        if not 0 < spec.local_size_ratio <= 1:
            raise ValueError(
                f"{key}.local_size_ratio must be in (0, 1], got {spec.local_size_ratio}"
            )
        if spec.local_size_multiple < 1:
            raise ValueError(
                f"{key}.local_size_multiple must be >= 1, got {spec.local_size_multiple}"
            )
        return spec

    @property
    def count(self) -> int:
        return self.global_crops + self.local_crops

    def local_size(self, size: int) -> int:
        """Side of local views for global views of ``size`` px (at least one multiple)."""
        multiple = self.local_size_multiple
        return max(multiple, round(size * self.local_size_ratio / multiple) * multiple)

    def sizes(self, size: int) -> list[int]:
        """The side of every view, in view order."""
        return [size] * self.global_crops + [self.local_size(size)] * self.local_crops


def build_ssl_view_transforms(
    cfg: Mapping[str, Any], size: int, views: ViewSpec
) -> list[A.Compose]:
    """One pipeline per view of ``views`` (global views first), from an SSL ``augment`` config.

    A pipeline object is shared by views of one kind; the dataset seeds each view apart.
    """
    crops = [(size, views.global_scale, views.global_crops)]
    crops.append((views.local_size(size), views.local_scale, views.local_crops))
    transforms: list[A.Compose] = []
    for side, scale, count in crops:
        if count:
            view_cfg = {**cfg, "crop_scale": scale} if scale is not None else cfg
            transforms += [build_ssl_view_transform(view_cfg, side)] * count
    return transforms


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
        RandomResizedCrop(
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
