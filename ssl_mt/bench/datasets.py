"""The data the loader rows read: ``--data``, a small synthetic set, or camera-size photos.

Camera-size photos are the synthetic scenes scaled up to 12 MP (4000 x 3000 by default) with
sensor-like noise, so that their JPEGs are about as large (and as slow to decode) as a
phone's; their masks are scaled with nearest neighbour and written as PNGs, as users bring
them.
"""

from __future__ import annotations

import contextlib
import math
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

from ssl_mt.bench.settings import DATA_ROWS, DECODE_ROW, BenchSettings
from ssl_mt.data.image_io import write_png
from ssl_mt.data.manifest import read_table
from ssl_mt.data.synthetic import generate_dataset

SYNTHETIC_VAL_FRACTION = 0.15
SYNTHETIC_MAX_IMAGES = 4096
CAMERA_SCENE_SIZE = 512  # side of the rendered scenes that are scaled up
CAMERA_JPEG_QUALITY = 92


def synthetic_count(s: BenchSettings) -> int:
    """Images for one pass of the longest row (warmup + steps) through the train split."""
    needed = max(b * (s.warmup + s.steps + max(s.workers) + 1) for b in s.batch_sizes)
    return min(SYNTHETIC_MAX_IMAGES, math.ceil(needed / (1 - SYNTHETIC_VAL_FRACTION)) + 8)


def generate_camera_dataset(
    out: Path, n: int, width: int = 4000, height: int = 3000, noise: float = 4.0, seed: int = 0
) -> Path:
    """Writes ``n`` synthetic scenes as ``width x height`` JPEGs with PNG masks (manifest format).

    Args:
        out: Dataset root to write.
        n: Number of photos (at least 2: one goes to the val split).
        width: Photo width in pixels.
        height: Photo height in pixels.
        noise: Standard deviation of the Gaussian noise added (grey levels). Entropy decoding
            does not shrink with the DCT scale, so the JPEG's size bounds what reduced decoding
            gains: 4 gives ~2.2 MB per 12 MP photo (phones write 2-5 MB), 0 ~1 MB.
        seed: Random seed of the scenes and the noise.
    """
    if n < 2:
        raise ValueError(f"a camera-size dataset needs at least 2 photos, got {n}")
    generate_dataset(
        out,
        n=n,
        size=CAMERA_SCENE_SIZE,
        seed=seed,
        val_fraction=max(SYNTHETIC_VAL_FRACTION, 1.0 / n),
        workers=1,
        progress=False,
    )
    rng = np.random.default_rng(seed)
    table = read_table(out)
    for _, row in table.iterrows():
        path = out / row["image"]
        small = cv2.imread(str(path), cv2.IMREAD_COLOR)
        big = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
        if noise > 0:
            grain = rng.normal(0.0, noise, big.shape).astype(np.float32)
            big = np.clip(big + grain, 0, 255).astype(np.uint8)
        if not cv2.imwrite(str(path), big, [cv2.IMWRITE_JPEG_QUALITY, CAMERA_JPEG_QUALITY]):
            raise OSError(f"could not write {path}")
        for column in ("skin_mask", "scalp_mask"):
            if row.get(column):
                mask_path = out / row[column]
                mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
                big_mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)
                write_png(mask_path, big_mask)
    return out


def bench_dataset(s: BenchSettings, stack: contextlib.ExitStack) -> tuple[Path | None, str]:
    """The dataset root the loader rows read (generated into a temporary directory when
    ``--data`` is not given) and its description."""
    if not {"simclr_e2e", "mt_e2e", *DATA_ROWS, DECODE_ROW} & set(s.only):
        return None, "-"
    if s.data is not None:
        root = Path(s.data)
        if not root.is_dir():
            raise FileNotFoundError(f"--data {root}: no such directory")
        return root, str(root)
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ssl_mt_bench_")))
    if s.camera:
        width, height = s.camera_size
        _log(s, f"generating {s.camera} camera-size photos of {width}x{height} px")
        root = generate_camera_dataset(
            tmp / "data", s.camera, width, height, s.camera_noise, s.seed
        )
        size = sum(p.stat().st_size for p in (root / "images").iterdir()) / s.camera / 2**20
        return root, (
            f"camera-size synthetic: {s.camera} JPEGs of {width}x{height} px (noise "
            f"{s.camera_noise:g}, {size:.1f} MiB each) + PNG masks"
        )
    n = s.synthetic_n or synthetic_count(s)
    px = s.synthetic_size or max(s.sizes)
    _log(s, f"generating {n} synthetic images of {px} px")
    root = generate_dataset(
        tmp / "data",
        n=n,
        size=px,
        seed=s.seed,
        val_fraction=SYNTHETIC_VAL_FRACTION,
        workers=0 if n > 64 else 1,  # 0: one process per core
        progress=False,
    )
    return root, f"synthetic: {n} images of {px} px"


def _log(s: BenchSettings, message: str) -> None:
    if s.progress:
        print(f"[bench] {message}", file=sys.stderr, flush=True)
