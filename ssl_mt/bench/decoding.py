"""The ``decode`` rows: how fast one worker decodes the training JPEGs at each DCT scale.

A JPEG decoded at 1/2, 1/4 or 1/8 scale skips most of the inverse DCT and colour conversion,
but not the entropy (Huffman) decoding of the whole file, whose cost grows with the file's
size. These rows time decoding alone (OpenCV, one thread, files already in the page cache),
so ``x full`` of the 1/8 row bounds what reduced decoding can gain for the pipelines on these
files, whatever the augmentation costs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import cv2

from ssl_mt.data.reduced_decoding import REDUCTIONS, read_header

# cv2.imread flags of each scale (1: full decoding).
_FLAGS = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}


def scale_label(factor: int) -> str:
    return "full" if factor == 1 else f"1/{factor}"


def jpeg_files(paths: Sequence[Path], limit: int) -> list[Path]:
    """The first ``limit`` JPEGs of ``paths`` (by their header, not their suffix)."""
    found = []
    for path in paths:
        header = read_header(path)
        if header is not None and header.format == "JPEG":
            found.append(path)
            if len(found) == limit:
                break
    return found


def time_decoding(paths: Sequence[Path], factor: int, passes: int = 1) -> float:
    """Seconds per image to decode ``paths`` at ``1/factor`` scale (after one untimed image).

    Raises:
        ValueError: A file cannot be decoded.
    """
    flag = _FLAGS[factor]

    def decode(path: Path) -> None:
        if cv2.imread(str(path), flag) is None:
            raise ValueError(f"{path}: OpenCV cannot decode this JPEG")

    decode(paths[0])
    start = time.perf_counter()
    for _ in range(passes):
        for path in paths:
            decode(path)
    return (time.perf_counter() - start) / (passes * len(paths))


def decode_rates(paths: Sequence[Path], passes: int = 1) -> dict[int, float]:
    """Images per second at full scale and at every reduction, for the same files."""
    return {factor: 1.0 / time_decoding(paths, factor, passes) for factor in (1, *REDUCTIONS[::-1])}


def mean_file_mib(paths: Sequence[Path]) -> float:
    return sum(p.stat().st_size for p in paths) / len(paths) / 2**20
