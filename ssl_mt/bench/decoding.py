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


def _decoder(factor: int):
    flag = _FLAGS[factor]

    def decode(path: Path) -> None:
        if cv2.imread(str(path), flag) is None:
            raise ValueError(f"{path}: OpenCV cannot decode this JPEG")

    return decode


def decode_rates(paths: Sequence[Path], passes: int = 1) -> dict[int, float]:
    """Images per second at full scale and at every reduction, for the same files.

    Each pass decodes every file at every scale in turn (one untimed image first), so a
    drift of the machine's speed weighs on every scale alike.

    Raises:
        ValueError: A file cannot be decoded.
    """
    factors = (1, *REDUCTIONS[::-1])
    seconds = dict.fromkeys(factors, 0.0)
    for factor in factors:
        _decoder(factor)(paths[0])
    for _ in range(passes):
        for factor in factors:
            decode = _decoder(factor)
            start = time.perf_counter()
            for path in paths:
                decode(path)
            seconds[factor] += time.perf_counter() - start
    return {factor: passes * len(paths) / seconds[factor] for factor in factors}


def mean_file_mib(paths: Sequence[Path]) -> float:
    return sum(p.stat().st_size for p in paths) / len(paths) / 2**20
