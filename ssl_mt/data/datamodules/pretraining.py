"""The SSL pretraining datamodule: multi-view images, plus labeled loaders for the kNN monitor."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from ssl_mt.data.datamodules.staged import StagedDataModule, require_root, require_split
from ssl_mt.data.datasets import MultiViewDataset, OnBadSample
from ssl_mt.data.manifest import MANIFEST_NAME, Sample, list_image_folder, load_manifest
from ssl_mt.data.transforms import (
    ViewSpec,
    build_ssl_view_transform,
    build_ssl_view_transforms,
)
from ssl_mt.schedule import ResolutionSchedule
from ssl_mt.tasks import parse_tasks


class SSLDataModule(StagedDataModule):
    """Multi-view images for self-supervised pretraining, plus labeled loaders for kNN.

    Images come from ``ROOT/labels.csv`` (train split) or, without a csv or with
    ``source=folder``, from every image below ROOT. When the manifest has labels for
    ``knn_tasks``, :meth:`val_dataloader` returns two loaders: the labeled train split (the
    kNN memory bank) and the val split (the queries).

    Args:
        root: Dataset root or image folder.
        stages: The schedule's stages: view size and per-device batch size (images; each
            yields ``n_views`` views) per range of epochs.
        eval_sizes: Resolutions of the schedule's evaluation; the kNN monitor uses the first.
        augment: The SSL augment config (``simclr`` or ``skin``).
        tasks: The ``tasks`` config; used to read labels for the kNN monitor.
        knn_tasks: Classification tasks whose labels the kNN monitor predicts.
        knn_max_samples: Cap on the bank and query sizes (keeps the monitor cheap).
        n_views: Views per image, all alike (used when ``views`` is None).
        views: The method's view declaration (see :class:`ssl_mt.data.transforms.ViewSpec`):
            global and local (multi-crop) views; replaces ``n_views``.
        source: ``auto`` (csv when present), ``manifest`` or ``folder``.
        reduced_decoding: Decode JPEGs at 1/2, 1/4 or 1/8 scale when every view's smallest
            crop still covers its output size; False: always in full.
        eval_cache_mb: MiB of kNN bank and query batches this process keeps in memory after
            their first pass (see :mod:`ssl_mt.data.eval_cache`); 0: read them every epoch.
    """

    def __init__(
        self,
        root: str,
        stages: Sequence[Mapping[str, Any]],
        eval_sizes: Sequence[int],
        augment: Mapping[str, Any],
        tasks: Mapping[str, Any] | None = None,
        knn_tasks: Sequence[str] = (),
        knn_max_samples: int = 5000,
        n_views: int = 2,
        views: Mapping[str, Any] | None = None,
        source: str = "auto",
        num_workers: int = 2,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        prefetch_factor: int = 2,
        val_fraction: float = 0.1,
        eval_batch_size: int = 64,
        on_bad_sample: OnBadSample = "raise",
        size_multiple: int = 1,
        seed: int = 0,
        reduced_decoding: bool = True,
        eval_cache_mb: float = 2048,
    ) -> None:
        super().__init__(
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            prefetch_factor=prefetch_factor,
            val_fraction=val_fraction,
            on_bad_sample=on_bad_sample,
            seed=seed,
            reduced_decoding=reduced_decoding,
            eval_cache_mb=eval_cache_mb,
        )
        if source not in ("auto", "manifest", "folder"):
            raise ValueError(f"data.source must be auto, manifest or folder, got {source!r}")
        self.schedule = ResolutionSchedule(stages, size_multiple)
        for i, stage in enumerate(self.schedule.stages):
            if stage.batch_size < 2:
                raise ValueError(
                    f"schedule.stages[{i}].batch_size={stage.batch_size}: contrastive learning "
                    "needs at least 2 images per device (the rest of the batch are the negatives)"
                )
        if not eval_sizes:
            raise ValueError("schedule.eval_sizes is empty")
        self.knn_size = int(eval_sizes[0])
        self.root = Path(root)
        self.eval_batch_size = eval_batch_size
        self.augment = augment
        self.all_tasks = parse_tasks(tasks) if tasks else []
        unknown = [n for n in knn_tasks if n not in {t.name for t in self.all_tasks}]
        if unknown:
            raise ValueError(
                f"data.knn_tasks: {unknown} are not configured tasks "
                f"({[t.name for t in self.all_tasks]})"
            )
        self.knn_tasks = [t for t in self.all_tasks if t.name in knn_tasks]
        if any(t.is_segmentation for t in self.knn_tasks):
            raise ValueError("data.knn_tasks must be classification tasks")
        self.knn_max_samples = knn_max_samples
        self.view_spec = ViewSpec.from_config(views) if views is not None else None
        self.n_views = self.view_spec.count if self.view_spec is not None else n_views
        self.source = source
        self.images: list[Path] = []
        self.knn_samples: dict[str, list[Sample]] = {}
        self._val_loaders: list[DataLoader] | None = None

    @property
    def uses_manifest(self) -> bool:
        has_csv = (self.root / MANIFEST_NAME).is_file()
        if self.source == "manifest" and not has_csv:
            raise FileNotFoundError(
                f"data.source=manifest but {self.root / MANIFEST_NAME} is missing"
            )
        return self.source != "folder" and has_csv

    def setup(self, stage: str | None = None) -> None:
        if self.images:
            return
        require_root(self.root)
        if not self.uses_manifest:
            self.images = list_image_folder(self.root)
            return
        samples = load_manifest(
            self.root, self.knn_tasks, val_fraction=self.val_fraction, require_columns=False
        )
        self.images = [s.image for s in samples if s.split == "train"]
        require_split(self.images, "train", self.root)
        for split in ("train", "val"):
            labeled = [
                s
                for s in samples
                if s.split == split
                and any(s.labels.get(t.name) is not None for t in self.knn_tasks)
            ]
            self.knn_samples[split] = labeled[: self.knn_max_samples]

    @property
    def has_knn(self) -> bool:
        return bool(self.knn_samples.get("train")) and bool(self.knn_samples.get("val"))

    @property
    def num_train_samples(self) -> int:
        return len(self.images)

    def view_transforms(self, size: int) -> list:
        if self.view_spec is not None:
            return build_ssl_view_transforms(self.augment, size, self.view_spec)
        return [build_ssl_view_transform(self.augment, size)] * self.n_views

    def train_dataset(self, stage_index: int) -> MultiViewDataset:
        size = self.schedule.stages[stage_index].size
        return MultiViewDataset(
            self.images,
            self.view_transforms(size),
            self.seed,
            self.on_bad_sample,
            self.reduced_decoding,
        )

    def val_dataloader(self) -> list[DataLoader]:
        """``[bank, queries]`` for the kNN monitor, or no loader when there are no labels."""
        if not self.has_knn:
            return []
        if self._val_loaders is None:
            self._val_loaders = [
                self.eval_loader(
                    self.knn_samples[split], self.knn_tasks, self.knn_size, split=f"knn {split}"
                )
                for split in ("train", "val")
            ]
        return self._val_loaders
