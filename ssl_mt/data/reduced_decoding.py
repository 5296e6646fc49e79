"""JPEGs decoded at 1/2, 1/4 or 1/8 scale when the crop needs no more pixels.

libjpeg scales in the DCT domain: at 1/s every 8x8 block yields (8/s)x(8/s) pixels, so
reduced pixel ``k`` is the mean of full-size pixels ``[k*s, (k+1)*s)`` and the reduced image
is ``ceil(H/s) x ceil(W/s)``, the last block partial. A 4000x3000 photo decodes in about a
quarter of the time at half scale, and a 384 px crop rarely needs more.

The header (format, size, EXIF orientation) is read without decoding, with PIL's lazy open.
OpenCV applies the EXIF orientation after scaling, so an axis the orientation reverses has
its partial block at the start instead of the end; masks are sampled accordingly, so they
stay on the reduced image's pixel grid exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from ssl_mt.data.image_io import BadSampleError

REDUCTIONS = (8, 4, 2)
_COLOR_FLAGS = {
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}
_EXIF_ORIENTATION = 0x0112
# EXIF orientation -> (rows reversed, columns reversed) of the displayed image against the
# stored one (5-8 also transpose, which does not move the partial block to the other end).
_REVERSED = {
    1: (False, False),
    2: (False, True),
    3: (True, True),
    4: (True, False),
    5: (False, False),
    6: (False, True),
    7: (True, True),
    8: (True, False),
}


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says, without decoding it.

    Attributes:
        format: PIL's format name (``JPEG``, ``PNG``, ...).
        height: Rows of the decoded image (EXIF orientation applied, as OpenCV does).
        width: Columns of the decoded image.
        orientation: EXIF orientation tag (1 when absent).
    """

    format: str
    height: int
    width: int
    orientation: int = 1


def read_header(path: str | Path) -> ImageHeader | None:
    """The header of an image file, or None when PIL cannot read it (the decoder will say why)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = int(image.getexif().get(_EXIF_ORIENTATION, 1) or 1)
            kind = image.format or ""
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    if orientation not in _REVERSED:
        orientation = 1
    if orientation >= 5:  # 90-degree rotations and transpositions swap the sides
        height, width = width, height
    return ImageHeader(kind, height, width, orientation)


def reduced_shape(height: int, width: int, factor: int) -> tuple[int, int]:
    """Height and width of an image decoded at ``1/factor`` scale."""
    return math.ceil(height / factor), math.ceil(width / factor)


@dataclass(frozen=True)
class DecodeGeometry:
    """Where the pixels of an image decoded at ``1/factor`` scale lie on the full image.

    Reduced pixel ``k`` averages full pixels ``[k*factor - offset, (k+1)*factor - offset)``
    along each axis; ``offset`` is non-zero on an axis whose partial block comes first.

    Attributes:
        height: Full height (EXIF orientation applied).
        width: Full width.
        factor: The reduction (1, 2, 4 or 8).
        offset_y: Rows of the first block that lie before the image.
        offset_x: Columns of the first block that lie before the image.
    """

    height: int
    width: int
    factor: int
    offset_y: int = 0
    offset_x: int = 0

    def span(self, start: int, end: int, axis: int) -> tuple[int, int]:
        """The full-size pixel range ``[start, end)`` of ``axis`` (0 rows, 1 columns) on the
        reduced grid: its length rounded to whole reduced pixels, kept inside the image."""
        offset, full = (self.offset_y, self.height) if axis == 0 else (self.offset_x, self.width)
        reduced = math.ceil(full / self.factor)
        length = min(reduced, max(1, round((end - start) / self.factor)))
        first = min(round((start + offset) / self.factor), reduced - length)
        return first, first + length


@dataclass(frozen=True)
class ReducedImage:
    """A JPEG decoded at ``1/factor`` scale, and how to bring its masks onto its grid.

    Attributes:
        image: RGB ``uint8`` array of shape ``reduced_shape(height, width, factor) + (3,)``.
        factor: The reduction (2, 4 or 8).
        header: The file's header: the full size the masks have.
    """

    image: np.ndarray
    factor: int
    header: ImageHeader

    @property
    def full_hw(self) -> tuple[int, int]:
        return self.header.height, self.header.width

    @property
    def geometry(self) -> DecodeGeometry:
        rows_reversed, cols_reversed = _REVERSED[self.header.orientation]
        height, width = self.image.shape[:2]
        return DecodeGeometry(
            self.header.height,
            self.header.width,
            self.factor,
            height * self.factor - self.header.height if rows_reversed else 0,
            width * self.factor - self.header.width if cols_reversed else 0,
        )

    def reduce_mask(self, mask: np.ndarray) -> np.ndarray:
        """A full-size mask sampled at the centre of every block of the reduced image.

        Nearest neighbour on the reduced grid: the result has the reduced image's shape and
        each value is the mask at the middle of the block its pixel averages (for an even
        factor the pixel just after the middle: half a full-size pixel off at most).
        """
        if mask.shape != self.full_hw:
            raise ValueError(f"mask is {mask.shape}, its image {self.full_hw}")
        g = self.geometry
        height, width = self.image.shape[:2]
        rows = _block_centres(g.height, height, g.factor, g.offset_y)
        cols = _block_centres(g.width, width, g.factor, g.offset_x)
        return mask[rows[:, None], cols[None, :]]


def _block_centres(full: int, reduced: int, factor: int, offset: int) -> np.ndarray:
    centres = np.arange(reduced) * factor + factor // 2 - offset
    return np.clip(centres, 0, full - 1)


def read_reduced_jpeg(
    path: str | Path, reduction_for: Callable[[int, int], int]
) -> ReducedImage | None:
    """Decodes a JPEG at the reduction ``reduction_for(height, width)`` allows.

    Args:
        path: Image file.
        reduction_for: Maps the full (oriented) height and width to a reduction: 1 (full
            decoding), 2, 4 or 8.

    Returns:
        The reduced image, or None when the file is not a JPEG, the reduction is 1, or the
        header cannot be read: the caller then decodes it in full (and reports what is wrong).

    Raises:
        BadSampleError: The JPEG's data cannot be decoded.
    """
    header = read_header(path)
    if header is None or header.format != "JPEG":
        return None
    factor = int(reduction_for(header.height, header.width))
    if factor == 1:
        return None
    if factor not in _COLOR_FLAGS:
        raise ValueError(f"JPEG reductions are 1, 2, 4 or 8, got {factor}")
    image = cv2.imread(str(path), _COLOR_FLAGS[factor])
    if image is None:
        raise BadSampleError(f"corrupt or unreadable image: {path}", path)
    if image.shape[:2] != reduced_shape(header.height, header.width, factor):
        return None  # a decoder that scales otherwise: full decoding is always right
    return ReducedImage(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), factor, header)
