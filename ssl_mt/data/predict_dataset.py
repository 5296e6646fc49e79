"""New photos for inference: a folder of images or a manifest, at the model's input size."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ssl_mt.data.image_io import read_image, read_mask
from ssl_mt.data.manifest import IMAGE_EXTENSIONS, MANIFEST_NAME, Sample, load_manifest
from ssl_mt.data.transforms import build_finetune_transform
from ssl_mt.tasks import TaskSpec


@dataclass(frozen=True)
class PredictInput:
    """What to predict: images (absolute paths), their names relative to ``root``, and the
    manifest rows when the input was a ``labels.csv`` (for metrics)."""

    root: Path
    images: list[Path]
    samples: list[Sample] | None = None

    def relative(self, index: int) -> Path:
        return self.images[index].relative_to(self.root)


def is_hidden(path: Path, root: Path) -> bool:
    """Hidden files and folders, and macOS ``._*`` companions (not images)."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def collect_inputs(source: str | Path, tasks: Sequence[TaskSpec]) -> PredictInput:
    """A folder of images (recursive, hidden files skipped) or a ``labels.csv`` manifest.

    Raises:
        FileNotFoundError: ``source`` does not exist, or holds no image.
        ValueError: ``source`` is a file but not a ``labels.csv``.
        ManifestError: The manifest is malformed (every problem named).
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"input not found: {source}")
    if source.is_file():
        if source.name != MANIFEST_NAME:
            raise ValueError(
                f"input {source} is a file; give a folder of images or a {MANIFEST_NAME} manifest"
            )
        root = source.resolve().parent
        samples = load_manifest(root, tasks, require_columns=False)
        return PredictInput(root, [s.image for s in samples], samples)
    root = source.resolve()
    images = sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not is_hidden(p, root)
    )
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found below {source}")
    # Outputs are named <relative path>.png: a.jpg and a.png would write the same mask.
    stems: dict[Path, Path] = {}
    for path in images:
        other = stems.setdefault(path.with_suffix(""), path)
        if other != path:
            raise ValueError(f"{other} and {path} would write the same output files; rename one")
    return PredictInput(root, images)


class PredictDataset(Dataset):
    """Items ``{"image": (3, S, S) normalised, "index": int, "hw": original (H, W)}``, plus for manifest inputs the
    labels at the image's original size (``target``/``present`` per task, masks (H, W))."""

    def __init__(
        self,
        inputs: PredictInput,
        tasks: Sequence[TaskSpec],
        size: int,
        normalization: Mapping[str, Any],
        with_labels: bool = False,
    ) -> None:
        self.inputs = inputs
        self.tasks = list(tasks)
        self.transform = build_finetune_transform(normalization, size, train=False)
        self.with_labels = with_labels and inputs.samples is not None

    def __len__(self) -> int:
        return len(self.inputs.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = read_image(self.inputs.images[index])
        item: dict[str, Any] = {
            "image": self.transform(image=image)["image"],
            "index": index,
            "hw": image.shape[:2],
        }
        if self.with_labels:
            sample = self.inputs.samples[index]
            hw = image.shape[:2]
            for task in self.tasks:
                label = sample.labels.get(task.name)
                item[f"present/{task.name}"] = label is not None
                if task.is_segmentation:
                    mask = read_mask(label, hw) if label is not None else None
                    item[f"target/{task.name}"] = None if mask is None else torch.from_numpy(mask)
                else:
                    item[f"target/{task.name}"] = -1 if label is None else int(label)
        return item


def collate_predict(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Images stacked; labels (masks of differing sizes) kept as lists."""
    batch: dict[str, Any] = {
        "image": torch.stack([it["image"] for it in items]),
        "index": torch.tensor([it["index"] for it in items]),
    }
    for key in items[0]:
        if key not in batch:
            batch[key] = [it[key] for it in items]
    return batch
