"""LightningDataModules for SSL pretraining and multi-task fine-tuning.

Both build their own :class:`EpochIndexSampler`, so Lightning keeps their loaders (and the
persistent workers behind them) instead of re-wrapping them every epoch, and every sample's
augmentation depends only on (seed, epoch, index). The multi-task evaluation loaders shard
without repeats (each val/test sample on exactly one rank), so metrics reduced over the
ranks count every sample once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ssl_mt.data.datasets import (
    EpochIndexSampler,
    MultiTaskDataset,
    MultiViewDataset,
    OnBadSample,
    collate_samples,
)
from ssl_mt.data.label_fraction import describe_counts, has_any_label, keep_label_fraction
from ssl_mt.data.manifest import (
    MANIFEST_NAME,
    Sample,
    list_image_folder,
    load_manifest,
    refuse_lossy_masks,
)
from ssl_mt.data.transforms import (
    ViewSpec,
    build_finetune_transform,
    build_ssl_view_transform,
    build_ssl_view_transforms,
)
from ssl_mt.schedule import ResolutionSchedule
from ssl_mt.tasks import TaskSpec, parse_tasks

log = logging.getLogger(__name__)


class _LoaderSettings:
    """DataLoader settings shared by both datamodules."""

    def __init__(
        self,
        num_workers: int,
        pin_memory: bool,
        persistent_workers: bool,
        prefetch_factor: int,
        seed: int,
    ) -> None:
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        self.num_workers = num_workers
        # Pinned memory only helps a copy to an accelerator (torch warns when there is none).
        self.pin_memory = pin_memory and torch.accelerator.is_available()
        self.persistent_workers = persistent_workers and num_workers > 0
        self.prefetch_factor = prefetch_factor if num_workers > 0 else None
        self.seed = seed

    def loader(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        world_size: int,
        rank: int,
        unrepeated: bool = False,
    ) -> DataLoader:
        if unrepeated:
            # Every sample once over the ranks (shards differ by at most one), instead of
            # DistributedSampler's padding, which repeats samples and counts them twice in
            # evaluation metrics. Lightning leaves any DistributedSampler in place.
            sampler = UnrepeatedDistributedSampler(
                dataset, num_replicas=world_size, rank=rank, shuffle=False
            )
        else:
            sampler = EpochIndexSampler(
                dataset,
                num_replicas=world_size,
                rank=rank,
                shuffle=shuffle,
                seed=self.seed,
                drop_last=drop_last,
            )
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            prefetch_factor=self.prefetch_factor,
            drop_last=drop_last,
            collate_fn=collate_samples,
            # Its own generator for the workers' base seed: creating an iterator then draws
            # nothing from the global one, so persistent workers (one iterator per run, not
            # per epoch) leave dropout's random stream as a resumed run will find it.
            generator=torch.Generator().manual_seed(self.seed),
        )


def _world(module: L.LightningDataModule) -> tuple[int, int]:
    trainer = module.trainer
    if trainer is None:
        return 1, 0
    return trainer.world_size, trainer.global_rank


def _batches_done_in_epoch(module: L.LightningDataModule) -> int:
    """Batches of the current epoch already trained when resuming from a mid-epoch checkpoint."""
    trainer = module.trainer
    fit_loop = getattr(trainer, "fit_loop", None)
    if fit_loop is None or not fit_loop.restarting:
        return 0
    # `processed`, not `completed`: a checkpoint written in on_train_batch_end has trained its
    # batch but not yet counted it as completed (Lightning completes it when it restarts).
    return int(fit_loop.epoch_loop.batch_progress.current.processed)


def _resume_position(module: L.LightningDataModule, loader: DataLoader) -> DataLoader:
    # Always: a restarting Lightning creates the epoch's iterator before it sets the sampler's
    # epoch, and worker processes draw their first indices at once, so a resumed run with
    # num_workers > 0 would otherwise replay epoch 0's order and augmentations.
    if module.trainer is not None:
        loader.sampler.set_epoch(module.trainer.current_epoch)
    done = _batches_done_in_epoch(module)
    if done:
        loader.sampler.skip_first(done * loader.batch_size)
    return loader


def _require_split(samples: Sequence[Sample], split: str, root: Path) -> None:
    if not samples:
        raise ValueError(
            f"{root / MANIFEST_NAME}: no samples in split {split!r}; set the `split` column "
            "or leave it out for an automatic split"
        )


class _StagedDataModule(L.LightningDataModule):
    """What both datamodules share: one train loader per schedule stage, kept for the whole
    stage (so persistent workers live on), resumed at the right batch, and evaluation
    loaders built once.

    Subclasses set ``schedule``, ``settings``, ``seed``, ``on_bad_sample``,
    ``reduced_decoding`` and implement
    :meth:`train_dataset` and :attr:`num_train_samples`.
    """

    schedule: ResolutionSchedule
    settings: _LoaderSettings
    lossy_mask_threshold: int | None = None

    def __init__(self) -> None:
        super().__init__()
        self._train_loader: tuple[int, DataLoader] | None = None

    @property
    def current_epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    @property
    def num_train_samples(self) -> int:
        raise NotImplementedError

    def train_dataset(self, stage_index: int) -> Dataset:
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        """The loader of the current epoch's stage; the same object for a whole stage."""
        index = self.schedule.index_at(self.current_epoch)
        if self._train_loader is None or self._train_loader[0] != index:
            self._train_loader = None  # let the previous stage's workers go first
            stage = self.schedule.stages[index]
            world, rank = _world(self)
            loader = self.settings.loader(
                self.train_dataset(index),
                stage.batch_size,
                shuffle=True,
                drop_last=True,
                world_size=world,
                rank=rank,
            )
            if len(loader) == 0:
                raise ValueError(
                    f"{self.num_train_samples} training samples over {world} device(s) make "
                    f"no full batch of {stage.batch_size}: lower the stage's batch_size"
                )
            self._train_loader = (index, loader)
        return _resume_position(self, self._train_loader[1])

    def eval_loader(
        self,
        samples: Sequence[Sample],
        tasks: Sequence[TaskSpec],
        size: int,
        unrepeated: bool = False,
        split: str = "val",
    ) -> DataLoader:
        """A sequential (sharded under DDP) loader of labeled samples resized to ``size``.

        ``unrepeated``: each sample on exactly one rank (metrics reduced over the ranks count
        it once); otherwise DistributedSampler pads the shards to equal length with repeats
        (what an ``all_gather`` of equal-sized tensors needs).
        """
        world, rank = _world(self)
        if unrepeated and len(samples) < world:
            # DDP broadcasts buffers at each rank's first evaluation forward: a rank without a
            # batch would leave the others waiting.
            raise ValueError(
                f"{self.root / MANIFEST_NAME}: {len(samples)} samples in split {split!r} over "
                f"{world} devices: every device needs at least one"
            )
        dataset = MultiTaskDataset(
            samples,
            tasks,
            build_finetune_transform(self.augment, size, train=False),
            self.seed,
            self.on_bad_sample,
            self.lossy_mask_threshold,
            self.reduced_decoding,
        )
        return self.settings.loader(
            dataset,
            self.eval_batch_size,
            shuffle=False,
            drop_last=False,
            world_size=world,
            rank=rank,
            unrepeated=unrepeated,
        )


class MultiTaskDataModule(_StagedDataModule):
    """Multi-task data with progressive training resolution and several eval resolutions.

    Args:
        root: Dataset root holding ``labels.csv``.
        tasks: The ``tasks`` config (task name -> declaration).
        stages: The schedule's stages (see :class:`ssl_mt.schedule.ResolutionSchedule`).
        eval_sizes: Validation/test resolutions; one loader each, evaluated every epoch.
        eval_batch_size: Per-device batch size of evaluation loaders.
        augment: The ``finetune`` augment config.
        size_multiple: Sizes must be multiples of this (the encoder's output stride).
        allow_lossy_masks: Accept masks stored as JPEG (refused by default: compression
            noise would become foreground), read as grey levels and thresholded.
        lossy_mask_threshold: Grey level (0-255) from which such a mask is foreground.
        reduced_decoding: Decode JPEGs at 1/2, 1/4 or 1/8 scale when the stage's smallest
            crop still covers its output size (masks follow); False: always in full.
        label_fraction: Share in (0, 1] of each task's labeled train samples to keep (see
            :mod:`ssl_mt.data.label_fraction`); train images left without any label are
            not fine-tuned on.
        label_seed: Data seed of that subset; not the run seed, so every run and arm
            sees the same labels.
    """

    def __init__(
        self,
        root: str,
        tasks: Mapping[str, Any],
        stages: Sequence[Mapping[str, Any]],
        eval_sizes: Sequence[int],
        eval_batch_size: int,
        augment: Mapping[str, Any],
        num_workers: int = 2,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        prefetch_factor: int = 2,
        val_fraction: float = 0.1,
        on_bad_sample: OnBadSample = "raise",
        size_multiple: int = 32,
        seed: int = 0,
        allow_lossy_masks: bool = False,
        lossy_mask_threshold: int = 128,
        reduced_decoding: bool = True,
        label_fraction: float = 1.0,
        label_seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 < float(label_fraction) <= 1.0:
            raise ValueError(f"data.label_fraction must be in (0, 1], got {label_fraction}")
        self.label_fraction = float(label_fraction)
        self.label_seed = int(label_seed)
        self.root = Path(root)
        self.tasks: list[TaskSpec] = parse_tasks(tasks)
        if not 0 < lossy_mask_threshold <= 255:
            raise ValueError(
                f"data.lossy_mask_threshold must be in 1..255, got {lossy_mask_threshold}"
            )
        self.lossy_mask_threshold = lossy_mask_threshold if allow_lossy_masks else None
        self.schedule = ResolutionSchedule(stages, size_multiple)
        self.eval_sizes = [int(s) for s in eval_sizes]
        bad = [s for s in self.eval_sizes if s % size_multiple or s < size_multiple]
        if bad or not self.eval_sizes:
            raise ValueError(
                f"data.eval_sizes={list(eval_sizes)}: need at least one size, each a multiple "
                f"of {size_multiple}"
            )
        self.eval_batch_size = eval_batch_size
        self.augment = augment
        self.val_fraction = val_fraction
        self.on_bad_sample = on_bad_sample
        self.seed = seed
        self.reduced_decoding = reduced_decoding
        self.settings = _LoaderSettings(
            num_workers, pin_memory, persistent_workers, prefetch_factor, seed
        )
        self.samples: dict[str, list[Sample]] = {}
        self._eval_loaders: dict[str, list[DataLoader]] = {}
        self._window_counts: tuple[tuple, torch.Tensor] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.samples:
            return
        samples = load_manifest(self.root, self.tasks, val_fraction=self.val_fraction)
        if self.lossy_mask_threshold is None:
            refuse_lossy_masks(self.root, samples, self.tasks)
        for split in ("train", "val", "test"):
            self.samples[split] = [s for s in samples if s.split == split]
        train, counts = keep_label_fraction(
            self.samples["train"], self.tasks, self.label_fraction, self.label_seed, self.root
        )
        self.samples["train"] = [s for s in train if has_any_label(s)]
        self.label_counts = counts
        log.info(
            describe_counts(self.label_fraction, counts, len(train) - len(self.samples["train"]))
        )
        _require_split(self.samples["train"], "train", self.root)
        _require_split(self.samples["val"], "val", self.root)

    @property
    def num_train_samples(self) -> int:
        return len(self.samples["train"])

    def train_dataset(self, stage_index: int) -> MultiTaskDataset:
        stage = self.schedule.stages[stage_index]
        transform = build_finetune_transform(
            self.augment, stage.size, train=True, strength=stage.aug_strength
        )
        return MultiTaskDataset(
            self.samples["train"],
            self.tasks,
            transform,
            self.seed,
            self.on_bad_sample,
            self.lossy_mask_threshold,
            self.reduced_decoding,
        )

    def train_label_counts(self, batch_idx: int, accumulate: int, task_names: Sequence[str]):
        """Labeled samples per task of this rank's accumulation window holding ``batch_idx``.

        Read from the manifest over the train sampler's order of the current epoch (no image
        decoded), so the loss of the window's first micro-batch can already be normalised by
        the count of the whole window. A ``(len(task_names),)`` float tensor; computed once
        per epoch and window size (``num_samples / world`` booleans, replaced every epoch).
        """
        if self._train_loader is None:
            raise RuntimeError("train_label_counts needs the train loader (train_dataloader())")
        index, loader = self._train_loader
        sampler = loader.sampler
        key = (index, sampler.epoch, accumulate, tuple(task_names))
        if self._window_counts is None or self._window_counts[0] != key:
            dataset = loader.dataset
            columns = [[t.name for t in dataset.tasks].index(name) for name in task_names]
            # The plain DistributedSampler order: positions as Lightning numbers the batches
            # (a resumed epoch skips its first batches but keeps their numbers).
            order = torch.tensor(list(DistributedSampler.__iter__(sampler)), dtype=torch.long)
            batch, batches = loader.batch_size, len(loader)
            flags = dataset.presence()[:, columns][order[: batches * batch]]
            per_batch = flags.reshape(batches, batch, len(columns)).sum(dim=1)
            windows = [part.sum(dim=0) for part in per_batch.split(accumulate)]
            self._window_counts = (key, torch.stack(windows).float())
        windows = self._window_counts[1]
        return windows[min(batch_idx // accumulate, len(windows) - 1)]

    def _eval_loaders_for(self, split: str) -> list[DataLoader]:
        if split not in self._eval_loaders:
            self._eval_loaders[split] = [
                self.eval_loader(self.samples[split], self.tasks, size, True, split)
                for size in self.eval_sizes
            ]
        return self._eval_loaders[split]

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per evaluation size, in the order of ``eval_sizes``."""
        return self._eval_loaders_for("val")

    def test_dataloader(self) -> list[DataLoader]:
        if not self.samples.get("test"):
            raise ValueError(f"{self.root / MANIFEST_NAME}: no samples in split 'test'")
        return self._eval_loaders_for("test")


class SSLDataModule(_StagedDataModule):
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
    ) -> None:
        super().__init__()
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
        self.val_fraction = val_fraction
        self.on_bad_sample = on_bad_sample
        self.seed = seed
        self.reduced_decoding = reduced_decoding
        self.settings = _LoaderSettings(
            num_workers, pin_memory, persistent_workers, prefetch_factor, seed
        )
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
        if not self.uses_manifest:
            self.images = list_image_folder(self.root)
            return
        samples = load_manifest(
            self.root, self.knn_tasks, val_fraction=self.val_fraction, require_columns=False
        )
        self.images = [s.image for s in samples if s.split == "train"]
        _require_split(self.images, "train", self.root)
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
                self.eval_loader(self.knn_samples[split], self.knn_tasks, self.knn_size)
                for split in ("train", "val")
            ]
        return self._val_loaders
