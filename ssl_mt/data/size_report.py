"""How large a dataset's images and masks are against the training sizes, and what a
downsized copy (``python -m ssl_mt.data prepare``) would save.

Sizes come from the file headers (no decoding). The loaders already decode JPEGs at reduced
scale when the crop allows, but masks are PNGs: a 12 MP mask is decoded in full for a 384 px
crop, and only a downsized copy avoids that.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ssl_mt.data.decode_scale import smallest_crop
from ssl_mt.data.manifest import Sample
from ssl_mt.data.reduced_decoding import read_header
from ssl_mt.data.transforms import build_finetune_transform, build_ssl_view_transform
from ssl_mt.tasks import TaskSpec

# Pixels now / pixels after `prepare` from which the copy is worth suggesting.
WORTH_PREPARING = 4.0
_SIDE_STEP = 32


@dataclass(frozen=True)
class SizeSummary:
    """Median sizes (height, width) of the images and of the masks, from their headers."""

    images: int
    image_hw: tuple[int, int] | None
    masks: int
    mask_hw: tuple[int, int] | None


def _median_hw(paths: Sequence[Path]) -> tuple[int, tuple[int, int] | None]:
    sizes = [(h.height, h.width) for h in map(read_header, paths) if h is not None]
    if not sizes:
        return 0, None
    heights, widths = zip(*sizes, strict=True)
    return len(sizes), (int(np.median(heights)), int(np.median(widths)))


def summarize_sizes(samples: Sequence[Sample], tasks: Sequence[TaskSpec]) -> SizeSummary:
    """Median image and mask sizes of ``samples`` (unreadable files are left to the check)."""
    masks = [
        Path(s.labels[t.name])
        for s in samples
        for t in tasks
        if t.is_segmentation and s.labels.get(t.name) is not None
    ]
    n_images, image_hw = _median_hw([s.image for s in samples])
    n_masks, mask_hw = _median_hw(masks)
    return SizeSummary(n_images, image_hw, n_masks, mask_hw)


def prepare_side(
    hw: tuple[int, int], train_size: int, augments: Sequence[Mapping[str, Any]]
) -> int | None:
    """The smallest longest side (a multiple of 32) at which an image of shape ``hw`` still
    lets the smallest crop of every augment preset at ``train_size`` cover the output; None
    when that is not smaller than the image."""
    height, width = hw
    ops = []
    for cfg in augments:
        if "color_jitter" in cfg:
            ops.append(build_ssl_view_transform(cfg, train_size).transforms[0])
        else:
            ops.append(build_finetune_transform(cfg, train_size, train=True).transforms[0])
    longest = max(height, width)
    for side in range(_SIDE_STEP * -(-train_size // _SIDE_STEP), longest, _SIDE_STEP):
        scale = side / longest
        h, w = max(1, round(height * scale)), max(1, round(width * scale))
        if all(min(smallest_crop(op, h, w)) >= train_size for op in ops):
            return side
    return None


def format_sizes(
    summary: SizeSummary, train_size: int, augments: Sequence[Mapping[str, Any]], root: Path
) -> list[str]:
    """Lines for ``data check``: the median sizes and, when they are far above the training
    size, the ``prepare`` command and what it saves per image and per mask."""

    def describe(hw: tuple[int, int] | None, count: int, kind: str) -> str:
        if hw is None:
            return f"no {kind}s"
        return f"median {kind} {hw[1]}x{hw[0]} (WxH, {hw[0] * hw[1] / 1e6:.1f} MP, {count} files)"

    lines = [
        f"sizes: {describe(summary.image_hw, summary.images, 'image')}; "
        f"{describe(summary.mask_hw, summary.masks, 'mask')}; training sizes up to {train_size} px"
    ]
    hw = summary.image_hw
    side = prepare_side(hw, train_size, augments) if hw is not None else None
    if side is None:
        return lines
    scale = side / max(hw)
    pixels = hw[0] * hw[1]
    after = round(hw[0] * scale) * round(hw[1] * scale)
    if pixels / after < WORTH_PREPARING:
        return lines
    saved = f"{pixels / after:.0f}x fewer pixels"
    lines.append(
        f"  far above the training size: `python -m ssl_mt.data prepare {root} --max-side {side}`"
        f" writes a copy at {round(hw[1] * scale)}x{round(hw[0] * scale)} ({after / 1e6:.2f} MP):"
        f" {saved} to decode per image"
        + (f" and per mask ({summary.masks} masks)" if summary.masks else "")
        + ", with the smallest crop still covering the training size."
    )
    if summary.masks:
        lines.append(
            "  masks are PNGs: reduced JPEG decoding (data.reduced_decoding, on by default) "
            "shrinks only the images' decoding cost, so every mask is decoded in full."
        )
    return lines
