"""Decoding images and masks, with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

# Several data workers each running a multi-threaded OpenCV oversubscribes the cores.
cv2.setNumThreads(0)


class BadSampleError(RuntimeError):
    """An image or mask cannot be used; the message names the file (and csv row if known)."""

    def __init__(self, message: str, path: Path | str | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else Path(path)


def read_image(path: str | Path) -> np.ndarray:
    """Decodes an image file to an RGB ``uint8`` array of shape (H, W, 3).

    Raises:
        BadSampleError: The file is missing, unreadable or not an image.
    """
    path = Path(path)
    if not path.is_file():
        raise BadSampleError(f"image not found: {path}", path)
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise BadSampleError(f"corrupt or unreadable image: {path}", path)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_mask(path: str | Path, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Decodes a single-channel mask PNG to a binary ``uint8`` array (0 or 1) of shape (H, W).

    Args:
        path: Mask file; 0 = background, any non-zero value = foreground.
        expected_hw: Height and width of the image it belongs to; checked when given.

    Raises:
        BadSampleError: The mask is missing, unreadable, not single-channel, or its size
            differs from its image.
    """
    path = Path(path)
    if not path.is_file():
        raise BadSampleError(f"mask not found: {path}", path)
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise BadSampleError(f"corrupt or unreadable mask: {path}", path)
    if mask.ndim != 2:
        raise BadSampleError(
            f"mask {path} has {mask.shape[2]} channels; masks must be single-channel PNGs", path
        )
    if expected_hw is not None and mask.shape != tuple(expected_hw):
        raise BadSampleError(
            f"mask {path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image is "
            f"{expected_hw[1]}x{expected_hw[0]}",
            path,
        )
    return (mask > 0).astype(np.uint8)


def write_png(path: str | Path, array: np.ndarray) -> None:
    """Writes an RGB (H, W, 3) or single-channel (H, W) uint8 array as a PNG, deterministically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if array.ndim == 3 else array
    if not cv2.imwrite(str(path), data, [cv2.IMWRITE_PNG_COMPRESSION, 3]):
        raise OSError(f"could not write {path}")
