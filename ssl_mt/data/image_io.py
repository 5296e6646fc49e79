"""Decoding images and masks, with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

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


# PNG: 8-byte signature, then the IHDR chunk; its colour type (byte 25) 3 means indexed.
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_PALETTE = 3
_HEADER_BYTES = 32


def lossy_format(path: str | Path) -> str | None:
    """The lossy format a file is stored in, from its bytes (not its name), or None.

    JPEG, and WebP in its lossy (VP8) flavour, smear a mask's edges and scatter faint
    non-zero values over its background: read as "non-zero = foreground", that noise
    becomes foreground.
    """
    with Path(path).open("rb") as handle:
        head = handle.read(_HEADER_BYTES)
    if head[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP" and head[12:16] == b"VP8 ":
        return "lossy WebP"
    return None


def is_palette_png(head: bytes) -> bool:
    """Whether the first bytes of a file are those of an indexed-colour (palette) PNG."""
    return head[:8] == _PNG_SIGNATURE and head[12:16] == b"IHDR" and head[25] == _PNG_PALETTE


def read_mask(
    path: str | Path,
    expected_hw: tuple[int, int] | None = None,
    lossy_threshold: int | None = None,
) -> np.ndarray:
    """Decodes a mask to a binary ``uint8`` array (0 or 1) of shape (H, W).

    Accepted: a single-channel image (8 or 16 bit; 0 = background, any non-zero value =
    foreground), or an indexed (palette) PNG as annotation tools save them, read as its
    palette indices (index 0 = background, any other index = foreground) whatever the
    palette's colours. A mask stored lossily (JPEG, lossy WebP) is refused unless
    ``lossy_threshold`` is given: it is then read as grey levels and foreground is
    ``value >= lossy_threshold``.

    Args:
        path: Mask file.
        expected_hw: Height and width of the image it belongs to; checked when given.
        lossy_threshold: Grey level (0-255) at which a lossily stored mask becomes
            foreground; None refuses such masks.

    Raises:
        BadSampleError: The mask is missing, unreadable, stored lossily (and not allowed),
            not single-channel, or its size differs from its image.
    """
    path = Path(path)
    if not path.is_file():
        raise BadSampleError(f"mask not found: {path}", path)
    lossy = lossy_format(path)
    if lossy is not None:
        if lossy_threshold is None:
            raise BadSampleError(
                f"mask {path} is stored as {lossy}, a lossy format whose compression noise "
                "would become foreground; save masks as PNG, or set data.allow_lossy_masks=true "
                "to threshold them at data.lossy_mask_threshold",
                path,
            )
        mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if mask is None:
            raise BadSampleError(f"corrupt or unreadable mask: {path}", path)
        return _checked_size(path, (mask >= lossy_threshold).astype(np.uint8), expected_hw)
    mask = mask_values(path)
    if mask is None:
        raise BadSampleError(f"corrupt or unreadable mask: {path}", path)
    if mask.ndim != 2:
        raise BadSampleError(
            f"mask {path} has {mask.shape[2]} channels; masks must be single-channel or "
            "indexed (palette) PNGs",
            path,
        )
    return _checked_size(path, (mask > 0).astype(np.uint8), expected_hw)


def mask_values(path: str | Path) -> np.ndarray | None:
    """A mask file's values as stored: the indices of an indexed (palette) PNG, otherwise
    the decoded array unchanged (possibly several channels); None when unreadable."""
    path = Path(path)
    with path.open("rb") as handle:
        head = handle.read(_HEADER_BYTES)
    if is_palette_png(head):
        return _palette_indices(path)
    # OpenCV would expand a palette to BGR, hence the indexed case above.
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def _palette_indices(path: Path) -> np.ndarray | None:
    """The palette indices of an indexed PNG, (H, W) uint8; None when it cannot be decoded."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode not in ("P", "PA"):
                return None
            return np.asarray(image.getchannel(0) if image.mode == "PA" else image)
    except (OSError, SyntaxError, ValueError):  # what Pillow raises for a damaged file
        return None


def _checked_size(path: Path, mask: np.ndarray, expected_hw: tuple[int, int] | None) -> np.ndarray:
    if expected_hw is not None and mask.shape != tuple(expected_hw):
        raise BadSampleError(
            f"mask {path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image is "
            f"{expected_hw[1]}x{expected_hw[0]}",
            path,
        )
    return mask


def write_png(path: str | Path, array: np.ndarray) -> None:
    """Writes an RGB (H, W, 3) or single-channel (H, W) uint8 array as a PNG, deterministically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if array.ndim == 3 else array
    if not cv2.imwrite(str(path), data, [cv2.IMWRITE_PNG_COMPRESSION, 3]):
        raise OSError(f"could not write {path}")


def bad_sample_message(error: BadSampleError) -> str:
    """The one-line description of a bad sample (file, and csv row when known).

    A ``DataLoader`` worker's exception reaches the main process re-raised with the
    worker's whole traceback as its message; the description is its last line.
    """
    text = str(error)
    marker = f"{BadSampleError.__name__}: "
    if text.startswith("Caught ") and marker in text:
        return text.rsplit(marker, 1)[1].strip()
    return text
