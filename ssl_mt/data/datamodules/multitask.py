"""The multi-task fine-tuning datamodule: progressive training resolution, several eval sizes.

Its evaluation loaders shard without repeats (each val/test sample on exactly one rank), so
metrics reduced over the ranks count every sample once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from ssl_mt.data.datamodules.staged import StagedDataModule, require_root, require_split
from ssl_mt.data.datasets import MultiTaskDataset, OnBadSample
from ssl_mt.data.label_fraction import describe_counts, has_any_label, keep_label_fraction
from ssl_mt.data.loaders import world_and_rank
from ssl_mt.data.manifest import MANIFEST_NAME, Sample, load_manifest, refuse_lossy_masks
from ssl_mt.data.transforms import build_finetune_transform
from ssl_mt.schedule import ResolutionSchedule
from ssl_mt.tasks import TaskSpec, parse_tasks

log = logging.getLogger(__name__)


class MultiTaskDataModule(StagedDataModule):
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
        eval_cache_mb: MiB of evaluation batches this process keeps in memory after their
            first pass (see :mod:`ssl_mt.data.eval_cache`); 0: read them every epoch.
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
        self.samples: dict[str, list[Sample]] = {}
        self._eval_loaders: dict[tuple[str, int], list[DataLoader]] = {}
        self._window_counts: tuple[tuple, torch.Tensor] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.samples:
            return
        require_root(self.root)
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
        require_split(self.samples["train"], "train", self.root)
        require_split(self.samples["val"], "val", self.root)

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

    def eval_loaders(self, split: str, sharded: bool = True) -> list[DataLoader]:
        """One loader of ``split`` per evaluation size, in the order of ``eval_sizes``; built
        once. ``sharded=False``: every sample on this rank (one process: the same loaders)."""
        world = world_and_rank(self)[0] if sharded else 1
        key = (split, world)
        if key not in self._eval_loaders:
            self._eval_loaders[key] = [
                self.eval_loader(self.samples[split], self.tasks, size, True, split, sharded)
                for size in self.eval_sizes
            ]
        return self._eval_loaders[key]

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per evaluation size, in the order of ``eval_sizes``."""
        return self.eval_loaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        if not self.samples.get("test"):
            raise ValueError(f"{self.root / MANIFEST_NAME}: no samples in split 'test'")
        return self.eval_loaders("test")
