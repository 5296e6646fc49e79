"""A downsized copy of a manifest dataset, so loaders do not decode 12-megapixel photos.

Images are shrunk (never enlarged) so that the longest side is at most ``max_side``, with
area interpolation; masks are resized with nearest neighbour to exactly the new image size
so they stay binary and aligned. Relative paths are kept, so ``labels.csv`` is copied as is.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from ssl_mt.data.check import jpeg_defect
from ssl_mt.data.image_io import BadSampleError, mask_values, read_image
from ssl_mt.data.manifest import (
    IMAGE_EXTENSIONS,
    MANIFEST_NAME,
    ManifestError,
    csv_line,
    read_table,
)
from ssl_mt.tasks import TaskSpec

JPEG_QUALITY = 95
_SKIP_COLUMNS = ("image", "split")
_JPEG = (".jpg", ".jpeg")


@dataclass(frozen=True)
class _Job:
    """One image and its masks, as paths relative to the dataset root."""

    row: int
    image: str
    masks: tuple[str, ...]


def prepare_dataset(
    root: str | Path,
    out: str | Path,
    max_side: int,
    workers: int = 0,
    tasks: Sequence[TaskSpec] | None = None,
    progress: bool = True,
) -> Path:
    """Writes a copy of the dataset at ``root`` with images no larger than ``max_side``.

    Files that already fit are copied byte for byte. A file that cannot be decoded, or a
    mask whose size differs from its image, is copied unchanged with a warning, so that
    ``python -m ssl_mt.data check`` on the copy still reports it.

    Args:
        root: Dataset root with ``labels.csv``.
        out: Root of the copy (created; must differ from ``root``).
        max_side: Longest side of the resized images, in pixels.
        workers: Worker processes (0 = one per CPU core, 1 = in this process).
        tasks: Tasks whose segmentation columns are masks; when None, every column whose
            cells name image files (``.png``, ...) is treated as a mask column.
        progress: Show a progress bar.

    Returns:
        ``out``.

    Raises:
        ValueError: ``max_side`` < 1 or ``out`` is ``root``.
        ManifestError: ``labels.csv`` is missing or a path leaves the dataset root.
    """
    root, out = Path(root), Path(out)
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    if out.resolve() == root.resolve():
        raise ValueError(f"out must differ from the dataset root {root}")
    table = read_table(root)
    jobs = _jobs(table, _mask_columns(table, tasks))
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(root / MANIFEST_NAME, out / MANIFEST_NAME)
    work = partial(_prepare_one, root, out, max_side)
    problems = [p for found in _map(work, jobs, workers, progress) for p in found]
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        warnings.warn(f"{len(problems)} file(s) copied unchanged:\n  {shown}{more}", stacklevel=2)
    return out


def _mask_columns(table: pd.DataFrame, tasks: Sequence[TaskSpec] | None) -> list[str]:
    if tasks is not None:
        return [t.column for t in tasks if t.is_segmentation and t.column in table.columns]
    return [
        column
        for column in table.columns
        if column not in _SKIP_COLUMNS
        and any(Path(cell.strip()).suffix.lower() in IMAGE_EXTENSIONS for cell in table[column])
    ]


def _jobs(table: pd.DataFrame, mask_columns: Sequence[str]) -> list[_Job]:
    jobs, seen = [], set()
    for i, image in enumerate(table["image"]):
        image = image.strip()
        if not image or image in seen:
            continue
        seen.add(image)
        masks = tuple(table[c].iloc[i].strip() for c in mask_columns if table[c].iloc[i].strip())
        for path in (image, *masks):
            _require_inside(path, csv_line(i))
        jobs.append(_Job(row=csv_line(i), image=image, masks=masks))
    return jobs


def _require_inside(path: str, row: int) -> None:
    relative = Path(path)
    if relative.is_absolute() or ".." in relative.parts:
        raise ManifestError(
            f"{MANIFEST_NAME} row {row}: {path!r} is not a path inside the dataset root, "
            "so the copy could not keep it valid"
        )


def _map(
    work: Callable[[_Job], list[str]], jobs: Sequence[_Job], workers: int, progress: bool
) -> list[list[str]]:
    workers = min(workers or os.cpu_count() or 1, max(1, len(jobs)))
    bar = tqdm(total=len(jobs), desc="prepare", unit="img", disable=not progress)
    results = []
    with bar:
        if workers <= 1:
            for result in map(work, jobs):
                results.append(result)
                bar.update(1)
            return results
        # spawn, not fork: the caller may have torch/OpenMP threads running.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            chunksize = max(1, min(16, len(jobs) // (workers * 8)))
            for result in pool.imap(work, jobs, chunksize=chunksize):
                results.append(result)
                bar.update(1)
    return results


def _prepare_one(root: Path, out: Path, max_side: int, job: _Job) -> list[str]:
    """Resizes or copies one image and its masks; returns problems (files copied unchanged)."""
    where = f"{MANIFEST_NAME} row {job.row}"
    source, target = root / job.image, out / job.image
    target.parent.mkdir(parents=True, exist_ok=True)
    defect = jpeg_defect(source.read_bytes()) if source.suffix.lower() in _JPEG else None
    try:
        if defect:
            raise BadSampleError(f"corrupt JPEG {source}: {defect}", source)
        bgr = cv2.cvtColor(read_image(source), cv2.COLOR_RGB2BGR)  # EXIF orientation applied
    except BadSampleError as error:  # copied unchanged, for `check` to report
        return [f"{where}: {error}", *_copy_existing(root, out, (job.image, *job.masks), where)]
    h, w = bgr.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return _copy_existing(root, out, (job.image, *job.masks), where)
    new_hw = (max(1, round(h * scale)), max(1, round(w * scale)))
    _write(target, cv2.resize(bgr, new_hw[::-1], interpolation=cv2.INTER_AREA))
    return [p for mask in job.masks if (p := _resize_mask(root, out, mask, (h, w), new_hw, where))]


def _copy_existing(root: Path, out: Path, paths: Sequence[str], where: str) -> list[str]:
    """Copies files byte for byte; returns a problem per missing mask."""
    problems = []
    for path in paths:
        if (root / path).is_file():
            (out / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / path, out / path)
        elif path != paths[0]:  # a missing image is already reported by the decoder
            problems.append(f"{where}: mask not found: {root / path}")
    return problems


def _resize_mask(
    root: Path,
    out: Path,
    mask: str,
    image_hw: tuple[int, int],
    new_hw: tuple[int, int],
    where: str,
) -> str | None:
    source, target = root / mask, out / mask
    target.parent.mkdir(parents=True, exist_ok=True)
    # A palette PNG becomes a grey one holding its indices: the same mask.
    array = mask_values(source) if source.is_file() else None
    if array is None or array.ndim != 2 or array.shape != image_hw:
        if source.is_file():
            shutil.copyfile(source, target)
        reason = (
            "missing or unreadable"
            if array is None
            else "not single-channel or not its image's size"
        )
        return f"{where}: mask {source} is {reason}"
    # NEAREST_EXACT samples pixel centres like the image resize; plain NEAREST shifts masks.
    _write(target, cv2.resize(array, new_hw[::-1], interpolation=cv2.INTER_NEAREST_EXACT))
    return None


def _write(path: Path, array: np.ndarray) -> None:
    """Writes in the format of the file name: JPEG at quality 95, PNG and others as is."""
    suffix = path.suffix.lower()
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if suffix in _JPEG else []
    if suffix == ".png":
        params = [cv2.IMWRITE_PNG_COMPRESSION, 3]
    if not cv2.imwrite(str(path), array, params):
        raise OSError(f"could not write {path}")
