"""At which JPEG scale to decode an image for a pipeline, and the crop that works on it.

A pipeline of :mod:`ssl_mt.data.transforms` starts with its only resampling of the source
image (a random resized crop, or the evaluation resize); everything after it works at the
output size. An image decoded at ``1/s`` scale is then as good as the full one when the crop
taken of it still covers the output size: the crop is shrunk either way, from DCT-domain
block means instead of full pixels, and is never upsampled where full decoding would not be.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import albumentations as A

from ssl_mt.data.reduced_decoding import REDUCTIONS, DecodeGeometry, reduced_shape

# Data key of a pipeline call: the DecodeGeometry of an image decoded at reduced scale.
DECODED_AT = "decoded_at"


class CropNeedsFullDecoding(RuntimeError):
    """The crop drawn would be upsampled more from the reduced image than from the full one
    (a planned reduction that did not hold): decode the image in full and draw again."""


class RandomResizedCrop(A.RandomResizedCrop):
    """albumentations' ``RandomResizedCrop``, drawn on the full image when the image was
    decoded at reduced scale.

    Called with ``decoded_at=DecodeGeometry(...)``, the crop is drawn as on the full-size
    image (the same random numbers: the same crop, and the same draws for every later
    operation, as with full decoding) and then placed on the reduced image's grid.
    :meth:`planned_crop` tells the crop the next call will draw, before the image is decoded.
    """

    def planned_crop(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of the crop the next call draws on a full ``height x width`` image.

        Draws from a copy of the generator's state: the call itself draws the same numbers
        (with ``p=1`` nothing else is drawn before the crop).
        """
        state = self.py_random.getstate()
        try:
            coords = super().get_params_dependent_on_data({"shape": (height, width)}, {})
        finally:
            self.py_random.setstate(state)
        x1, y1, x2, y2 = coords["crop_coords"]
        return y2 - y1, x2 - x1

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, tuple[int, int, int, int]]:
        geometry: DecodeGeometry | None = data.get(DECODED_AT)
        if geometry is None or geometry.factor == 1:
            return super().get_params_dependent_on_data(params, data)
        full = {**params, "shape": (geometry.height, geometry.width)}
        x1, y1, x2, y2 = super().get_params_dependent_on_data(full, data)["crop_coords"]
        top, bottom = geometry.span(y1, y2, axis=0)
        left, right = geometry.span(x1, x2, axis=1)
        out_h, out_w = self.size
        if _upsampling(out_h, out_w, bottom - top, right - left) > _upsampling(
            out_h, out_w, y2 - y1, x2 - x1
        ):
            raise CropNeedsFullDecoding(
                f"a {y2 - y1}x{x2 - x1} crop at 1/{geometry.factor} scale is below {out_h}x{out_w}"
            )
        return {"crop_coords": (left, top, right, bottom)}


def _upsampling(out_h: int, out_w: int, crop_h: int, crop_w: int) -> float:
    return max(1.0, out_h / crop_h, out_w / crop_w)


def smallest_crop(op: A.BasicTransform, height: int, width: int) -> tuple[int, int] | None:
    """The smallest (height, width) the first geometric ``op`` can take of an image.

    ``RandomResizedCrop`` draws an area fraction and an aspect ratio (rejecting crops that do
    not fit, falling back to a centre crop): its smallest sides come from the lowest area
    and the extreme ratios, rounded as albumentations rounds them. ``Resize`` takes the whole
    image. Any other operation: None (nothing known, so nothing may be reduced).
    """
    if isinstance(op, A.RandomResizedCrop):
        low = op.scale[0] * height * width
        ratio_low, ratio_high = op.ratio
        crop_h = round(math.sqrt(low / ratio_high))
        crop_w = round(math.sqrt(low * ratio_low))
        in_ratio = width / height
        if in_ratio < ratio_low:
            fallback = (round(width / ratio_low), width)
        elif in_ratio > ratio_high:
            fallback = (height, round(height * ratio_high))
        else:
            fallback = (height, width)
        return min(crop_h, fallback[0]), min(crop_w, fallback[1])
    if isinstance(op, A.Resize):
        return height, width
    return None


def _output_hw(op: A.BasicTransform) -> tuple[int, int]:
    if isinstance(op, A.Resize):
        return op.height, op.width
    return tuple(op.size)


def decode_reduction(
    transform: A.Compose, height: int, width: int, reductions: Sequence[int] = REDUCTIONS
) -> int:
    """The largest JPEG reduction at which even the stage's smallest crop covers the output.

    The smallest crop is drawn on the full image and placed on the reduced grid
    (:class:`RandomResizedCrop`: sides ``round(side / s)``); the evaluation resize takes the
    whole ``ceil(H/s) x ceil(W/s)`` image. No crop of the stage is then upsampled at ``1/s``.

    Args:
        transform: A pipeline of :mod:`ssl_mt.data.transforms` (its first operation decides).
        height: Full image height (EXIF orientation applied).
        width: Full image width.
        reductions: Candidate reductions, largest first.

    Returns:
        The largest candidate that fits, or 1 (decode in full).
    """
    op = transform.transforms[0] if transform.transforms else None
    if not isinstance(op, RandomResizedCrop | A.Resize):
        return 1
    smallest = smallest_crop(op, height, width)
    out_h, out_w = _output_hw(op)
    for factor in reductions:
        if isinstance(op, A.Resize):
            crop_h, crop_w = reduced_shape(height, width, factor)
        else:
            crop_h, crop_w = (max(1, round(side / factor)) for side in smallest)
        if crop_h >= out_h and crop_w >= out_w:
            return factor
    return 1


def planned_reduction(
    transform: A.Compose, height: int, width: int, reductions: Sequence[int] = REDUCTIONS
) -> int:
    """The largest JPEG reduction at which the crop ``transform`` draws next (it is seeded
    for the coming call) still covers its output; at least :func:`decode_reduction`.

    Most crops are larger than the stage's smallest one, so most images decode smaller than
    the stage-wide bound allows: at 384 px a 20%-to-100% crop of a 12 MP photo needs
    1/4 scale, not 1/2. The evaluation resize is the same for every image.
    """
    op = transform.transforms[0] if transform.transforms else None
    if not isinstance(op, RandomResizedCrop):
        return decode_reduction(transform, height, width, reductions)
    crop_h, crop_w = op.planned_crop(height, width)
    out_h, out_w = op.size
    for factor in reductions:
        if round(crop_h / factor) >= out_h and round(crop_w / factor) >= out_w:
            return factor
    return decode_reduction(transform, height, width, reductions)
