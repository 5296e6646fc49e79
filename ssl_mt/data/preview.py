"""Look at a dataset before training on it: masks over images, labels, augmented views.

``preview_grid`` overlays every segmentation mask (semi-transparent, with its contour) and
writes the classification labels under each tile, so a misaligned mask or a wrong class
mapping shows at a glance. ``preview_views`` shows what SimCLR's two views of an image look
like under an ``augment`` preset, the quickest way to see what a preset destroys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ssl_mt.data.image_io import BadSampleError, read_image, read_mask
from ssl_mt.data.manifest import MANIFEST_NAME, Sample, list_image_folder, parse_rows, read_table
from ssl_mt.tasks import TaskSpec

# Overlay colours of the segmentation tasks, in task order (skin green, scalp magenta, ...).
MASK_COLOURS = ((40, 220, 60), (240, 40, 220), (40, 160, 255), (255, 160, 0), (255, 255, 60))
MASK_ALPHA = 0.4
UNLABELED = "—"
_DPI = 100
_LINE_PX = 11
_PAD_PX = 4


def preview_grid(
    root: str | Path,
    out: str | Path,
    tasks: Sequence[TaskSpec],
    n: int = 16,
    seed: int = 0,
    size: int = 192,
) -> Path:
    """Draws ``n`` random samples with their masks overlaid and their labels written.

    Args:
        root: A dataset root with ``labels.csv``, or a plain folder of images.
        out: PNG file to write.
        tasks: Tasks to show: segmentation masks are overlaid, all labels are written.
        n: Number of samples (fewer if the dataset is smaller).
        seed: Which samples are drawn.
        size: Side of each tile in pixels.

    Returns:
        ``out``.
    """
    samples = _pick(load_samples(root, tasks), n, seed)
    segmentation = [t for t in tasks if t.is_segmentation]
    colours = {t.name: MASK_COLOURS[i % len(MASK_COLOURS)] for i, t in enumerate(segmentation)}
    tiles, captions = [], []
    for sample in samples:
        tile, notes = _overlay_tile(sample, segmentation, colours, size)
        tiles.append(tile)
        captions.append([sample.image.name, *(_label_text(sample, t) for t in tasks), *notes])
    legend = ", ".join(f"{name}: {_colour_name(rgb)}" for name, rgb in colours.items())
    title = f"{Path(root).name}: {len(samples)} samples" + (f" (masks: {legend})" if legend else "")
    return _save_grid(tiles, captions, _columns(len(tiles)), size, out, title)


def preview_views(
    root: str | Path,
    out: str | Path,
    augment_cfg: Mapping[str, Any],
    n: int = 8,
    size: int = 192,
    seed: int = 0,
) -> Path:
    """Draws ``n`` rows of [original, view 1, view 2] under an SSL augmentation preset.

    Args:
        root: A dataset root with ``labels.csv``, or a plain folder of images.
        out: PNG file to write.
        augment_cfg: An ``augment`` config (``conf/augment/simclr.yaml`` or ``skin.yaml``).
        n: Number of images.
        size: Side of each tile and of the views in pixels.
        seed: Which images are drawn and which augmentations are applied.

    Returns:
        ``out``.
    """
    from ssl_mt.data.transforms import build_ssl_view_transform

    transform = build_ssl_view_transform(augment_cfg, size)
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)
    mean = np.asarray(augment_cfg["mean"], np.float32)
    std = np.asarray(augment_cfg["std"], np.float32)
    tiles, captions = [], []
    for sample in _pick(load_samples(root, ()), n, seed):
        image = read_image(sample.image)
        tiles.append(_letterbox(image, size))
        captions.append([sample.image.name])
        for view in (1, 2):
            tensor = transform(image=image)["image"]
            tiles.append(_unnormalise(np.asarray(tensor), mean, std))
            captions.append([f"view {view}"])
    name = augment_cfg.get("name", "augment")
    return _save_grid(tiles, captions, 3, size, out, f"SSL views, preset {name!r}")


def load_samples(root: str | Path, tasks: Sequence[TaskSpec]) -> list[Sample]:
    """Samples of a manifest root (rows with csv problems skipped) or of an image folder."""
    root = Path(root)
    if (root / MANIFEST_NAME).is_file():
        table = read_table(root)
        present = [t for t in tasks if t.column in table.columns]
        samples, _ = parse_rows(root, table, present)
    else:
        samples = [Sample(image=p, split="", row=0) for p in list_image_folder(root)]
    if not samples:
        raise FileNotFoundError(f"no usable samples in {root}")
    return samples


def _pick(samples: Sequence[Sample], n: int, seed: int) -> list[Sample]:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    chosen = np.random.default_rng(seed).choice(len(samples), min(n, len(samples)), replace=False)
    return [samples[i] for i in sorted(chosen)]


def _label_text(sample: Sample, task: TaskSpec) -> str:
    value = sample.labels.get(task.name)
    if value is None:
        return f"{task.name}: {UNLABELED}"
    if task.is_segmentation:
        return f"{task.name}: mask"
    return f"{task.name}: {task.classes[int(value)]}"


def _overlay_tile(
    sample: Sample,
    tasks: Sequence[TaskSpec],
    colours: Mapping[str, tuple[int, int, int]],
    size: int,
) -> tuple[np.ndarray, list[str]]:
    """The sample's image fitted into a square tile, masks blended in; notes on bad files."""
    try:
        image = read_image(sample.image)
    except BadSampleError:
        return np.full((size, size, 3), 64, np.uint8), ["unreadable image"]
    tile = _letterbox(image, size)
    notes = []
    for task in tasks:
        path = sample.labels.get(task.name)
        if path is None:
            continue
        try:
            mask = read_mask(path, expected_hw=image.shape[:2])
        except BadSampleError:
            notes.append(f"bad {task.name} mask")
            continue
        _blend_mask(tile, _letterbox(mask, size, cv2.INTER_NEAREST), colours[task.name])
    return tile, notes


def _blend_mask(tile: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> None:
    on = mask > 0
    tile[on] = (tile[on] * (1 - MASK_ALPHA) + np.asarray(colour) * MASK_ALPHA).astype(np.uint8)
    contours, _ = cv2.findContours(on.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(tile, contours, -1, colour, 1)


def _letterbox(array: np.ndarray, size: int, interpolation: int = cv2.INTER_AREA) -> np.ndarray:
    """Fits an image or mask into a ``size`` square, keeping its aspect ratio, padded grey/0."""
    h, w = array.shape[:2]
    scale = size / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    if scale > 1 and interpolation == cv2.INTER_AREA:
        interpolation = cv2.INTER_LINEAR
    resized = cv2.resize(array, (new_w, new_h), interpolation=interpolation)
    fill = 96 if array.ndim == 3 else 0
    canvas = np.full((size, size, *array.shape[2:]), fill, array.dtype)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = resized
    return canvas


def _unnormalise(chw: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    hwc = chw.transpose(1, 2, 0) * std + mean
    return np.clip(hwc * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _colour_name(rgb: tuple[int, int, int]) -> str:
    names = {
        (40, 220, 60): "green",
        (240, 40, 220): "magenta",
        (40, 160, 255): "blue",
        (255, 160, 0): "orange",
        (255, 255, 60): "yellow",
    }
    return names.get(tuple(rgb), str(rgb))


def _columns(count: int) -> int:
    return max(1, int(np.ceil(np.sqrt(count))))


def _fit(line: str, size: int) -> str:
    """Shortens a caption line to about the width of its tile."""
    limit = max(8, size // 6)
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _save_grid(
    tiles: Sequence[np.ndarray],
    captions: Sequence[Sequence[str]],
    columns: int,
    size: int,
    out: str | Path,
    title: str,
) -> Path:
    """Lays tiles out on a grid, each with its caption lines underneath, and saves a PNG."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = int(np.ceil(len(tiles) / columns))
    caption_px = max(len(c) for c in captions) * _LINE_PX + _PAD_PX
    cell_w, cell_h = size + 2 * _PAD_PX, size + caption_px + _PAD_PX
    title_px = 2 * _LINE_PX + _PAD_PX
    width, height = columns * cell_w, rows * cell_h + title_px
    figure = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, facecolor="white")
    FigureCanvasAgg(figure)
    figure.text(
        0.5, 1 - (_LINE_PX + _PAD_PX / 2) / height, title, ha="center", va="center", fontsize=8
    )
    for i, (tile, caption) in enumerate(zip(tiles, captions, strict=True)):
        row, column = divmod(i, columns)
        left = column * cell_w + _PAD_PX
        top = title_px + row * cell_h
        axes = figure.add_axes(
            (left / width, 1 - (top + size) / height, size / width, size / height)
        )
        axes.imshow(tile, interpolation="nearest")
        axes.set_axis_off()
        for j, line in enumerate(_fit(c, size) for c in caption):
            y = top + size + _PAD_PX / 2 + (j + 0.5) * _LINE_PX
            figure.text(
                left / width, 1 - y / height, line, va="center", fontsize=7, family="DejaVu Sans"
            )
    figure.savefig(out, dpi=_DPI, facecolor="white", metadata={"Software": None})
    return out
