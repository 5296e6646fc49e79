"""The staged base of both datamodules: one train loader per schedule stage, evaluation loaders.

Both datamodules build their own :class:`~ssl_mt.data.datasets.EpochIndexSampler` (see
:mod:`ssl_mt.data.loaders`), so Lightning keeps their loaders (and the persistent workers
behind them) instead of re-wrapping them every epoch, and every sample's augmentation depends
only on (seed, epoch, index).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, Dataset

from ssl_mt.data.datasets import MultiTaskDataset
from ssl_mt.data.eval_cache import MemoryBudget
from ssl_mt.data.loaders import LoaderSettings, resume_position, world_and_rank
from ssl_mt.data.manifest import MANIFEST_NAME, Sample
from ssl_mt.data.transforms import build_finetune_transform
from ssl_mt.schedule import ResolutionSchedule
from ssl_mt.tasks import TaskSpec

# The default ``data.root`` of both apps (conf/data/*.yaml): what `make data` generates.
DEFAULT_ROOT = Path("data/synthetic")


def require_root(root: Path) -> None:
    """Stops with the way out when ``data.root`` does not exist (e.g. the default
    ``data/synthetic`` before ``make data``)."""
    if root.exists():
        return
    generated = (
        "; it is the default, the synthetic dataset `make data` generates "
        "(python -m ssl_mt.data generate --out data/synthetic)"
        if root == DEFAULT_ROOT
        else ""
    )
    raise FileNotFoundError(
        f"data.root {root} does not exist (relative to {Path.cwd()}){generated}; "
        "pass data.root=DIR: a dataset with labels.csv, or for pretraining a folder of images"
    )


def require_split(samples: Sequence[Sample], split: str, root: Path) -> None:
    if not samples:
        raise ValueError(
            f"{root / MANIFEST_NAME}: no samples in split {split!r}; set the `split` column "
            "or leave it out for an automatic split"
        )


class StagedDataModule(L.LightningDataModule):
    """What both datamodules share: one train loader per schedule stage, kept for the whole
    stage (so persistent workers live on), resumed at the right batch, and evaluation
    loaders built once.

    The constructor takes what both read (the ``data`` config keys of the same names);
    subclasses set ``schedule`` and implement :meth:`train_dataset` and
    :attr:`num_train_samples`.
    """

    schedule: ResolutionSchedule
    lossy_mask_threshold: int | None = None

    def __init__(
        self,
        *,
        num_workers: int,
        pin_memory: bool,
        persistent_workers: bool,
        prefetch_factor: int | None,
        val_fraction: float,
        on_bad_sample: str,
        seed: int,
        reduced_decoding: bool,
        eval_cache_mb: float,
    ) -> None:
        super().__init__()
        self.val_fraction = val_fraction
        self.on_bad_sample = on_bad_sample
        self.seed = seed
        self.reduced_decoding = reduced_decoding
        self.settings = LoaderSettings(
            num_workers, pin_memory, persistent_workers, prefetch_factor, seed
        )
        self.eval_cache = MemoryBudget(eval_cache_mb)
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
            world, rank = world_and_rank(self)
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
        return resume_position(self, self._train_loader[1])

    def eval_loader(
        self,
        samples: Sequence[Sample],
        tasks: Sequence[TaskSpec],
        size: int,
        unrepeated: bool = False,
        split: str = "val",
        sharded: bool = True,
    ) -> DataLoader:
        """A sequential (sharded under DDP) loader of labeled samples resized to ``size``.

        ``unrepeated``: each sample on exactly one rank (metrics reduced over the ranks count
        it once); otherwise DistributedSampler pads the shards to equal length with repeats
        (what an ``all_gather`` of equal-sized tensors needs). ``sharded=False``: every
        sample, whatever the number of ranks. Its first complete pass is replayed from
        memory while it fits in ``data.eval_cache_mb`` (see :mod:`ssl_mt.data.eval_cache`).
        """
        world, rank = world_and_rank(self) if sharded else (1, 0)
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
            cache=self.eval_cache,
            name=f"{split}@{size}",
        )
