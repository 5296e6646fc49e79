"""PyTorch datasets over the manifest: multi-task samples and multi-view SSL samples.

Every sample's augmentation is seeded from (seed, epoch, index), so a run reproduces the
same views whatever the number of workers, and a resumed run the views it would have seen.
The epoch reaches worker processes through :class:`EpochIndexSampler`, which yields
``(epoch, index)`` keys.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, default_collate

from ssl_mt.data.decode_scale import DECODED_AT, CropNeedsFullDecoding, planned_reduction
from ssl_mt.data.image_io import BadSampleError, read_image, read_mask
from ssl_mt.data.manifest import Sample
from ssl_mt.data.reduced_decoding import ReducedImage, read_reduced_jpeg
from ssl_mt.tasks import TaskSpec

OnBadSample = Literal["raise", "skip"]
BAD_SAMPLE_KEY = "bad_sample"


class EpochIndexSampler(DistributedSampler):
    """A ``DistributedSampler`` that yields ``(epoch, index)`` keys instead of indices.

    Being a ``DistributedSampler`` it shards across ranks (``num_replicas=1`` for one
    process), Lightning calls its ``set_epoch`` and leaves it in place instead of wrapping it.
    """

    _skip: tuple[int, int] = (-1, 0)

    def skip_first(self, count: int) -> None:
        """Leaves out the first ``count`` keys of the current epoch's order, once.

        A run resumed from a mid-epoch checkpoint continues the epoch where it stopped
        instead of repeating its first batches (Lightning restarts the iterator).
        """
        self._skip = (self.epoch, max(0, int(count)))

    def __iter__(self):  # type: ignore[override]
        epoch = self.epoch
        skip_epoch, skip = self._skip
        skip = skip if skip_epoch == epoch else 0
        self._skip = (-1, 0)
        for position, index in enumerate(super().__iter__()):
            if position >= skip:
                yield (epoch, index)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed that depends only on the run seed, the epoch and the sample index."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def _split_key(key: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(key, tuple):
        return int(key[0]), int(key[1])
    return 0, int(key)


class _SeededDataset(Dataset):
    def __init__(self, seed: int, on_bad_sample: OnBadSample, reduced_decoding: bool) -> None:
        if on_bad_sample not in ("raise", "skip"):
            raise ValueError(f"on_bad_sample must be 'raise' or 'skip', got {on_bad_sample!r}")
        self.seed = seed
        self.on_bad_sample = on_bad_sample
        self.reduced_decoding = reduced_decoding

    def _decode(
        self, path: Path, calls: Sequence[tuple[A.Compose, int]], reduce: bool
    ) -> tuple[np.ndarray, ReducedImage | None]:
        """The RGB image, at the smallest JPEG scale at which the crop of every coming call
        ``(transform, seed offset)`` is still not upsampled (see
        :func:`~ssl_mt.data.decode_scale.planned_reduction`), else in full."""
        if reduce:

            def reduction_for(height: int, width: int) -> int:
                return min(
                    planned_reduction(self._seeded(t, offset), height, width) for t, offset in calls
                )

            reduced = read_reduced_jpeg(path, reduction_for)
            if reduced is not None:
                return reduced.image, reduced
        return read_image(path), None

    def _load(self, index: int, reduce: bool) -> dict[str, Any]:
        raise NotImplementedError

    def _describe(self, index: int) -> str:
        raise NotImplementedError

    def _context(self, index: int, error: BadSampleError) -> str:
        """What a raised error adds to its message: what the error does not name already."""
        return self._describe(index)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = _split_key(key)
        self._epoch_seed = sample_seed(self.seed, epoch, index)
        try:
            try:
                item = self._load(index, self.reduced_decoding)
            except CropNeedsFullDecoding:  # a plan that did not hold: exact, only slower
                item = self._load(index, reduce=False)
        except BadSampleError as error:
            if self.on_bad_sample == "raise":
                context = self._context(index, error)
                message = f"{error} ({context})" if context else str(error)
                raise BadSampleError(message, error.path) from None
            return {BAD_SAMPLE_KEY: f"{self._describe(index)}: {error}"}
        item["index"] = index
        return item

    def _seeded(self, transform: A.Compose, offset: int = 0) -> A.Compose:
        transform.set_random_seed((self._epoch_seed + offset) % 2**32)
        return transform


class MultiTaskDataset(_SeededDataset):
    """Image, per-task targets and per-task presence flags.

    Items are ``{"image": (3,H,W) float, "target": {task: tensor}, "present": {task: bool},
    "index": int}``. Segmentation targets are (1,H,W) float masks in {0,1}; classification
    targets are class indices (-1 when unlabeled). An unlabeled task gets a dummy target
    and ``present=False``, so losses and metrics skip it. Masks stored lossily (JPEG) are
    refused unless ``lossy_mask_threshold`` is set (see :func:`read_mask`).

    With ``reduced_decoding`` a JPEG is decoded at the smallest scale the transform's crop
    allows and its masks are sampled onto that image's pixel grid.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        tasks: Sequence[TaskSpec],
        transform: A.Compose,
        seed: int = 0,
        on_bad_sample: OnBadSample = "raise",
        lossy_mask_threshold: int | None = None,
        reduced_decoding: bool = True,
    ) -> None:
        super().__init__(seed, on_bad_sample, reduced_decoding)
        self.lossy_mask_threshold = lossy_mask_threshold
        self.samples = list(samples)
        self.tasks = list(tasks)
        self.seg_tasks = [t for t in self.tasks if t.is_segmentation]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def presence(self) -> torch.Tensor:
        """(N, T) bool: sample i is labeled for task j (from the manifest, no image read)."""
        return torch.tensor(
            [[s.labels.get(t.name) is not None for t in self.tasks] for s in self.samples],
            dtype=torch.bool,
        ).reshape(len(self.samples), len(self.tasks))

    def _describe(self, index: int) -> str:
        sample = self.samples[index]
        return f"labels.csv row {sample.row}, image {sample.image}"

    def _context(self, index: int, error: BadSampleError) -> str:
        sample = self.samples[index]
        if error.path == sample.image:
            return f"labels.csv row {sample.row}"
        return self._describe(index)

    def _load(self, index: int, reduce: bool) -> dict[str, Any]:
        sample = self.samples[index]
        image, reduced = self._decode(sample.image, [(self.transform, 0)], reduce)
        masks = []
        for task in self.seg_tasks:
            path = sample.labels.get(task.name)
            if path is None:
                masks.append(np.zeros(image.shape[:2], np.uint8))
            elif reduced is None:
                masks.append(read_mask(path, image.shape[:2], self.lossy_mask_threshold))
            else:  # checked at full size, then onto the reduced image's grid
                mask = read_mask(path, reduced.full_hw, self.lossy_mask_threshold)
                masks.append(reduced.reduce_mask(mask))
        data = {"image": image, **_decoded_at(reduced)}
        if masks:
            data["masks"] = masks
        out = self._seeded(self.transform)(**data)
        target: dict[str, torch.Tensor] = {}
        present: dict[str, torch.Tensor] = {}
        for k, task in enumerate(self.seg_tasks):
            target[task.name] = torch.as_tensor(out["masks"][k]).float().unsqueeze(0)
        for task in self.tasks:
            label = sample.labels.get(task.name)
            present[task.name] = torch.tensor(label is not None)
            if not task.is_segmentation:
                target[task.name] = torch.tensor(-1 if label is None else int(label))
        return {"image": out["image"], "target": target, "present": present}


class MultiViewDataset(_SeededDataset):
    """Several augmented views of one image, decoded once per item.

    Items are ``{"views": [tensor, ...], "index": int}``, one view per transform. With
    ``reduced_decoding`` a JPEG is decoded at the smallest scale that every view's crop allows.
    """

    def __init__(
        self,
        images: Sequence[Path],
        view_transforms: Sequence[A.Compose],
        seed: int = 0,
        on_bad_sample: OnBadSample = "raise",
        reduced_decoding: bool = True,
    ) -> None:
        super().__init__(seed, on_bad_sample, reduced_decoding)
        if len(view_transforms) < 1:
            raise ValueError("MultiViewDataset needs at least one view transform")
        self.images = list(images)
        self.view_transforms = list(view_transforms)

    def __len__(self) -> int:
        return len(self.images)

    def _describe(self, index: int) -> str:
        return f"image {self.images[index]}"

    def _context(self, index: int, error: BadSampleError) -> str:
        return "" if error.path == Path(self.images[index]) else self._describe(index)

    def _load(self, index: int, reduce: bool) -> dict[str, Any]:
        calls = [(t, v) for v, t in enumerate(self.view_transforms)]
        image, reduced = self._decode(self.images[index], calls, reduce)
        at = _decoded_at(reduced)
        views = [
            self._seeded(transform, offset=v)(image=image, **at)["image"]
            for v, transform in enumerate(self.view_transforms)
        ]
        return {"views": views}


def _decoded_at(reduced: ReducedImage | None) -> dict[str, Any]:
    """Pipeline data that lets the crop be drawn as on the full image."""
    return {} if reduced is None else {DECODED_AT: reduced.geometry}


def collate_samples(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Default collation that sets skipped bad samples aside instead of failing.

    The batch gains ``bad_samples``: descriptions of the items that could not be loaded
    (only in ``on_bad_sample=skip`` mode), so the training loop can count and list them.
    """
    good = [item for item in items if BAD_SAMPLE_KEY not in item]
    bad = [item[BAD_SAMPLE_KEY] for item in items if BAD_SAMPLE_KEY in item]
    batch = default_collate(good) if good else {}
    batch["bad_samples"] = bad
    return batch
