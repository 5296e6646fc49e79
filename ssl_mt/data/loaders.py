"""DataLoader settings, the trainer's world and the resume position of the datamodules' loaders.

Every loader gets its own :class:`~ssl_mt.data.datasets.EpochIndexSampler` (or, for
evaluation without repeats, Lightning's ``UnrepeatedDistributedSampler``), so Lightning keeps
the loaders instead of re-wrapping them, and a resumed run continues at the batch and with
the sample order it stopped at.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset

from ssl_mt.data.datasets import EpochIndexSampler, collate_samples
from ssl_mt.data.eval_cache import CachingDataLoader, MemoryBudget


class LoaderSettings:
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
        cache: MemoryBudget | None = None,
        name: str = "eval",
    ) -> DataLoader:
        """A loader with these settings; ``cache``: a :class:`CachingDataLoader` named
        ``name`` that replays its first complete pass from memory within that budget
        (evaluation loaders, whose items are deterministic)."""
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
        caching = {} if cache is None else {"budget": cache, "name": name}
        return (DataLoader if cache is None else CachingDataLoader)(
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
            **caching,
        )


def world_and_rank(module: L.LightningDataModule) -> tuple[int, int]:
    trainer = module.trainer
    if trainer is None:
        return 1, 0
    return trainer.world_size, trainer.global_rank


def batches_done_in_epoch(module: L.LightningDataModule) -> int:
    """Batches of the current epoch already trained when resuming from a mid-epoch checkpoint."""
    trainer = module.trainer
    fit_loop = getattr(trainer, "fit_loop", None)
    if fit_loop is None or not fit_loop.restarting:
        return 0
    # `processed`, not `completed`: a checkpoint written in on_train_batch_end has trained its
    # batch but not yet counted it as completed (Lightning completes it when it restarts).
    return int(fit_loop.epoch_loop.batch_progress.current.processed)


def resume_position(module: L.LightningDataModule, loader: DataLoader) -> DataLoader:
    # Always: a restarting Lightning creates the epoch's iterator before it sets the sampler's
    # epoch, and worker processes draw their first indices at once, so a resumed run with
    # num_workers > 0 would otherwise replay epoch 0's order and augmentations.
    if module.trainer is not None:
        loader.sampler.set_epoch(module.trainer.current_epoch)
    done = batches_done_in_epoch(module)
    if done:
        loader.sampler.skip_first(done * loader.batch_size)
    return loader
