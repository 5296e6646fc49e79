"""Evaluation batches replayed from memory: same tensors, budget kept, interrupted passes."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import Dataset, SequentialSampler

from ssl_mt.config import load_group, load_tasks_config
from ssl_mt.data.datamodules import MultiTaskDataModule
from ssl_mt.data.datasets import MultiTaskDataset
from ssl_mt.data.eval_cache import CachingDataLoader, MemoryBudget, batch_nbytes
from tests.helpers import bare_trainer
from tests.models.test_multitask import make_module


class CountingDataset(Dataset):
    """Deterministic items; counts the reads of this process."""

    def __init__(self, n: int = 10) -> None:
        self.n = n
        self.reads = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        self.reads += 1
        return {"image": torch.full((3, 4, 4), float(index)), "index": index}


def make_loader(dataset: Dataset, budget: MemoryBudget, **kwargs) -> CachingDataLoader:
    settings = {"batch_size": 4, "sampler": SequentialSampler(dataset)}
    settings.update(kwargs)
    return CachingDataLoader(dataset, budget=budget, name="val@4", **settings)


def item_bytes() -> int:
    return 3 * 4 * 4 * 4 + 8  # the float32 image and the int64 index


def test_the_second_pass_replays_the_first_without_reading(caplog):
    dataset = CountingDataset(10)
    budget = MemoryBudget(1)
    loader = make_loader(dataset, budget)
    with caplog.at_level(logging.INFO, logger="ssl_mt.data.eval_cache"):
        first = list(loader)
    assert dataset.reads == 10 and len(first) == 3
    assert "val@4: 3 batches" in caplog.text and "data.eval_cache_mb=1" in caplog.text
    assert budget.used == 10 * item_bytes() == sum(batch_nbytes(b) for b in first)
    second = list(loader)
    assert dataset.reads == 10, "a held pass must not read its files again"
    assert all(a is b for a, b in zip(first, second, strict=True))
    assert [b["index"].tolist() for b in second] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_a_pass_stopped_after_len_batches_is_held():
    """Lightning asks for ``len(loader)`` batches and no more: the pass is complete then."""
    dataset = CountingDataset(8)
    loader = make_loader(dataset, MemoryBudget(1))
    iterator = iter(loader)
    batches = [next(iterator) for _ in range(len(loader))]
    assert loader.cached is not None and len(loader.cached) == 2
    assert torch.equal(batches[1]["image"], loader.cached[1]["image"])


def test_an_interrupted_pass_is_not_held_and_gives_its_budget_back():
    dataset = CountingDataset(10)
    budget = MemoryBudget(1)
    loader = make_loader(dataset, budget)
    for _ in loader:
        break  # e.g. limit_val_batches=1
    assert loader.cached is None and budget.used == 0
    list(loader)
    assert loader.cached is not None and budget.used == 10 * item_bytes()


def test_batches_over_budget_are_read_every_pass_and_the_log_says_why(caplog):
    dataset = CountingDataset(10)
    budget = MemoryBudget(5 * item_bytes() / 2**20)  # room for one batch of four, not three
    loader = make_loader(dataset, budget)
    with caplog.at_level(logging.INFO, logger="ssl_mt.data.eval_cache"):
        assert len(list(loader)) == 3
        assert len(list(loader)) == 3
    assert loader.cached is None and budget.used == 0
    assert dataset.reads == 20
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1, "said once, not every pass"
    assert "val@4" in messages[0] and "data.eval_cache_mb" in messages[0]
    assert "read every pass" in messages[0]


def test_loaders_share_one_budget():
    budget = MemoryBudget(12 * item_bytes() / 2**20)
    first, second = CountingDataset(10), CountingDataset(10)
    held, refused = make_loader(first, budget), make_loader(second, budget)
    list(held), list(refused)
    assert held.cached is not None and refused.cached is None
    assert budget.used == 10 * item_bytes()


def test_a_zero_budget_never_holds_anything():
    dataset = CountingDataset(6)
    loader = make_loader(dataset, MemoryBudget(0))
    list(loader), list(loader)
    assert loader.cached is None and dataset.reads == 12


def test_a_negative_budget_names_its_key():
    with pytest.raises(ValueError, match=r"data\.eval_cache_mb"):
        MemoryBudget(-1)


def test_persistent_workers_stop_once_the_batches_are_held():
    loader = make_loader(
        CountingDataset(10), MemoryBudget(1), num_workers=2, persistent_workers=True
    )
    first = [b["index"].tolist() for b in loader]
    assert loader.cached is not None and loader._iterator is None
    assert [b["index"].tolist() for b in loader] == first


# -- through the datamodule and a Lightning fit ------------------------------------------------
def make_datamodule(root, **kwargs) -> MultiTaskDataModule:
    settings = {
        "root": str(root),
        "tasks": load_tasks_config("default"),
        "stages": [{"size": 32, "epochs": 3, "batch_size": 8}],
        "eval_sizes": [32, 64],
        "eval_batch_size": 7,
        "augment": load_group("augment", "finetune"),
        "num_workers": 0,
        "pin_memory": False,
        "persistent_workers": False,
    }
    settings.update(kwargs)
    datamodule = MultiTaskDataModule(**settings)
    datamodule.setup("fit")
    return datamodule


def test_held_val_batches_equal_freshly_read_ones(synthetic_root, monkeypatch):
    reads = []
    original = MultiTaskDataset.__getitem__

    def counting(self, key):
        reads.append(key)
        return original(self, key)

    monkeypatch.setattr(MultiTaskDataset, "__getitem__", counting)
    cached = make_datamodule(synthetic_root)
    fresh = make_datamodule(synthetic_root, eval_cache_mb=0)
    for loader in cached.val_dataloader():
        list(loader)
    read_once = len(reads)
    assert read_once == 2 * len(cached.samples["val"])
    for held_loader, fresh_loader in zip(
        cached.val_dataloader(), fresh.val_dataloader(), strict=True
    ):
        for held, read in zip(held_loader, fresh_loader, strict=True):
            assert held["index"].tolist() == read["index"].tolist()
            assert torch.equal(held["image"], read["image"])
            for task in read["target"]:
                assert torch.equal(held["target"][task], read["target"][task])
                assert torch.equal(held["present"][task], read["present"][task])
    assert len(reads) == 2 * read_once, "the held loaders read nothing the second time"
    # The evaluation records of one process read the same (held) loaders.
    assert cached.eval_loaders("val", sharded=False) is cached.val_dataloader()


class _ValMetrics(L.Callback):
    def __init__(self) -> None:
        self.per_epoch: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.per_epoch.append(
            {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        )


def _fit(root, tmp_path, eval_cache_mb: float) -> tuple[list[dict[str, float]], list]:
    torch.manual_seed(0)
    module = make_module(eval_sizes=(32, 64))
    datamodule = make_datamodule(root, eval_cache_mb=eval_cache_mb)
    spy = _ValMetrics()
    trainer = bare_trainer(tmp_path, max_epochs=3, callbacks=[spy])
    trainer.fit(module, datamodule=datamodule)
    return spy.per_epoch, datamodule.val_dataloader()


def test_a_fit_validates_held_batches_as_it_would_read_ones(synthetic_root, tmp_path):
    """Same metrics every epoch with and without the cache; the held batches are unchanged
    by validation (a CPU run hands them to the model as they are)."""
    held_metrics, held_loaders = _fit(synthetic_root, tmp_path / "held", 2048)
    read_metrics, _ = _fit(synthetic_root, tmp_path / "read", 0)
    assert all(loader.cached is not None for loader in held_loaders)
    assert len(held_metrics) == 3 and held_metrics[0]
    assert held_metrics == read_metrics
    fresh = make_datamodule(synthetic_root, eval_cache_mb=0)
    for loader, fresh_loader in zip(held_loaders, fresh.val_dataloader(), strict=True):
        for held, read in zip(loader.cached, fresh_loader, strict=True):
            assert torch.equal(held["image"], read["image"])


def test_ranks_holding_and_reading_their_shards_yield_the_same_batches(synthetic_root):
    """Under DDP every rank holds its own shard or not (the budget is per process): the cache
    makes no collective call and never changes a rank's batches, so a rank over budget and
    one within it stay in step."""
    budgets = {0: 2048, 1: 1e-6}  # rank 1's shard does not fit
    seen: dict[int, list[int]] = {}
    for rank, budget in budgets.items():
        datamodule = make_datamodule(synthetic_root, eval_cache_mb=budget)
        datamodule.trainer = SimpleNamespace(current_epoch=0, world_size=2, global_rank=rank)
        reference = make_datamodule(synthetic_root, eval_cache_mb=0)
        reference.trainer = datamodule.trainer
        expected = [[b["index"].tolist() for b in loader] for loader in reference.val_dataloader()]
        for _ in range(2):
            got = [[b["index"].tolist() for b in loader] for loader in datamodule.val_dataloader()]
            assert got == expected
        held = [loader.cached is not None for loader in datamodule.val_dataloader()]
        assert held == [rank == 0] * 2
        seen[rank] = [i for batch in expected[0] for i in batch]
    assert sorted(seen[0] + seen[1]) == list(
        range(len(make_datamodule(synthetic_root).samples["val"]))
    )
