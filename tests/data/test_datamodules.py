"""The multi-task datamodule: progressive resolution, eval sizes, presence flags, bad input."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ssl_mt.config import load_group, load_tasks_config
from ssl_mt.data.datamodules import MultiTaskDataModule
from ssl_mt.data.datasets import BAD_SAMPLE_KEY, MultiTaskDataset, collate_samples
from ssl_mt.data.image_io import BadSampleError
from ssl_mt.data.manifest import ManifestError, load_manifest
from ssl_mt.data.transforms import build_finetune_transform
from ssl_mt.schedule import ScheduleError
from ssl_mt.tasks import parse_tasks

STAGES = [
    {"size": 32, "epochs": 2, "batch_size": 4},
    {"size": 64, "epochs": 1, "batch_size": 2},
]
SEG = ("skin", "scalp")
CLS = ("blur", "tone", "relevance")


@pytest.fixture(scope="module")
def augment():
    return load_group("augment", "finetune")


def make_dm(root: Path, augment, **kwargs) -> MultiTaskDataModule:
    settings = {
        "root": str(root),
        "tasks": load_tasks_config("default"),
        "stages": STAGES,
        "eval_sizes": [32, 64],
        "eval_batch_size": 5,
        "augment": augment,
        "num_workers": 0,
        "pin_memory": False,
        "persistent_workers": False,
    }
    settings.update(kwargs)
    return MultiTaskDataModule(**settings)


def fake_trainer(epoch: int = 0, world_size: int = 1, rank: int = 0) -> SimpleNamespace:
    return SimpleNamespace(current_epoch=epoch, world_size=world_size, global_rank=rank)


def read_csv(root: Path) -> list[dict[str, str]]:
    with (root / "labels.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def write_csv(root: Path, rows: list[dict[str, str]]) -> None:
    with (root / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def copied_root(synthetic_root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(synthetic_root, tmp_path / "data"))


# -- progressive resolution --------------------------------------------------------------------


def test_train_loader_switches_size_and_batch_at_the_stage_boundary(synthetic_root, augment):
    dm = make_dm(synthetic_root, augment)
    dm.setup("fit")
    n_train = dm.num_train_samples
    assert n_train > 8
    trainer = fake_trainer()
    dm.trainer = trainer
    expected = {0: (32, 4), 1: (32, 4), 2: (64, 2)}
    loaders = {}
    for epoch, (size, batch_size) in expected.items():
        trainer.current_epoch = epoch
        loader = dm.train_dataloader()
        loaders[epoch] = loader
        assert len(loader) == n_train // batch_size  # drop_last
        batches = list(loader)
        assert len(batches) == len(loader)
        for batch in batches:
            assert batch["image"].shape == (batch_size, 3, size, size)
            for task in SEG:
                assert batch["target"][task].shape == (batch_size, 1, size, size)
            for task in CLS:
                assert batch["target"][task].shape == (batch_size,)
            assert batch["bad_samples"] == []
        seen = torch.cat([b["index"] for b in batches]).tolist()
        assert len(set(seen)) == len(seen) == (n_train // batch_size) * batch_size
    assert loaders[0] is loaders[1], "the loader must be reused within a stage"
    assert loaders[2] is not loaders[1]
    # Past the end of the schedule: the last stage's loader, unchanged.
    trainer.current_epoch = 7
    assert dm.train_dataloader() is loaders[2]


def test_epochs_shuffle_differently_and_reproducibly(synthetic_root, augment):
    dm = make_dm(synthetic_root, augment)
    dm.setup("fit")
    dm.trainer = fake_trainer()
    loader = dm.train_dataloader()

    def order(epoch: int) -> list[int]:
        loader.sampler.set_epoch(epoch)  # what Lightning does every epoch
        return torch.cat([b["index"] for b in loader]).tolist()

    assert order(0) == order(0)
    assert order(0) != order(1)


def test_planned_optimizer_steps_match_the_real_loaders(synthetic_root, augment):
    dm = make_dm(synthetic_root, augment, stages=[{"size": 32, "epochs": 2, "batch_size": 3}])
    dm.setup("fit")
    n_train = dm.num_train_samples
    # An odd count on 2 ranks: floor(41 / 2) = 20 samples = 6 batches, ceil = 21 = 7 batches.
    assert n_train % 2 == 1 and (n_train // 2) // 3 != -(-n_train // 2) // 3
    for world in (1, 2, 3):
        lengths = []
        for rank in range(world):
            dm._train_loader = None
            dm.trainer = fake_trainer(0, world, rank)
            lengths.append(len(dm.train_dataloader()))
        assert len(set(lengths)) == 1, "every rank must run the same number of batches"
        planned = dm.schedule.optimizer_steps(n_train, world, accumulate=1)
        assert planned == [2 * lengths[0]], f"world_size={world}, n_train={n_train}"


def test_eval_loaders_yield_each_eval_size_and_every_sample(synthetic_root, augment):
    dm = make_dm(synthetic_root, augment)
    dm.setup("fit")
    dm.trainer = fake_trainer(epoch=2)
    loaders = dm.val_dataloader()
    assert len(loaders) == 2
    assert dm.val_dataloader() is loaders  # built once
    n_val = len(dm.samples["val"])
    for loader, size in zip(loaders, [32, 64], strict=True):
        batches = list(loader)
        indices = torch.cat([b["index"] for b in batches]).tolist()
        assert indices == list(range(n_val)), "eval loaders keep order and drop nothing"
        for batch in batches:
            assert batch["image"].shape[1:] == (3, size, size)
            assert batch["target"]["skin"].shape[1:] == (1, size, size)
            assert batch["image"].shape[0] <= 5


def test_presence_flags_and_targets_match_the_csv_cells(synthetic_root, augment):
    dm = make_dm(synthetic_root, augment)
    dm.setup("fit")
    tasks = {t.name: t for t in dm.tasks}
    rows = {r["image"]: r for r in read_csv(synthetic_root)}
    loader = dm.val_dataloader()[1]
    checked = {name: [0, 0] for name in tasks}  # [labeled, unlabeled] seen per task
    for batch in loader:
        for j, index in enumerate(batch["index"].tolist()):
            sample = dm.samples["val"][index]
            row = rows[sample.image.relative_to(synthetic_root).as_posix()]
            for name, task in tasks.items():
                cell = row[task.column].strip()
                present = bool(batch["present"][name][j])
                assert present == bool(cell), f"{sample.image.name} {name}: {cell!r}"
                checked[name][0 if present else 1] += 1
                target = batch["target"][name][j]
                if task.is_segmentation:
                    if present:
                        mask = cv2.imread(str(synthetic_root / cell), cv2.IMREAD_UNCHANGED)
                        assert (target.sum() > 0) == (mask.max() > 0)
                    else:
                        assert target.sum() == 0
                else:
                    assert int(target) == (task.class_index(cell) if cell else -1)
    # The val split exercises both labeled and unlabeled cells for at least some tasks.
    assert all(labeled > 0 for labeled, _ in checked.values())
    assert any(unlabeled > 0 for _, unlabeled in checked.values())


def test_train_presence_flags_match_csv_including_unlabeled_rows(synthetic_root, augment):
    dm = make_dm(synthetic_root, augment)
    dm.setup("fit")
    dm.trainer = fake_trainer()
    rows = {r["image"]: r for r in read_csv(synthetic_root)}
    for batch in dm.train_dataloader():
        for j, index in enumerate(batch["index"].tolist()):
            sample = dm.samples["train"][index]
            row = rows[sample.image.relative_to(synthetic_root).as_posix()]
            for task in dm.tasks:
                assert bool(batch["present"][task.name][j]) == bool(row[task.column].strip())


def test_eval_size_not_a_multiple_is_refused(synthetic_root, augment):
    with pytest.raises(ValueError, match="multiple of 32"):
        make_dm(synthetic_root, augment, eval_sizes=[48])
    with pytest.raises(ScheduleError, match=r"multiple of 32 \(e\.g\. 64\)"):
        make_dm(synthetic_root, augment, stages=[{"size": 72, "epochs": 1, "batch_size": 2}])


def test_zero_epoch_stage_is_refused(synthetic_root, augment):
    with pytest.raises(ScheduleError, match=r"stages\[1\]\.epochs must be >= 1"):
        make_dm(
            synthetic_root,
            augment,
            stages=[
                {"size": 32, "epochs": 1, "batch_size": 2},
                {"size": 64, "epochs": 0, "batch_size": 2},
            ],
        )


def test_batch_larger_than_the_data_is_a_clear_error(synthetic_root, augment):
    dm = make_dm(synthetic_root, augment, stages=[{"size": 32, "epochs": 1, "batch_size": 4096}])
    dm.setup("fit")
    with pytest.raises(ValueError, match="no full batch of 4096"):
        dm.train_dataloader()


# -- bad input, found before training --------------------------------------------------------


def test_task_without_column_names_the_task_and_column(synthetic_root, augment):
    tasks = OmegaConf.merge(
        load_tasks_config("default"),
        {"age": {"kind": "classification", "column": "age_group", "classes": ["young", "old"]}},
    )
    dm = make_dm(synthetic_root, augment, tasks=tasks)
    with pytest.raises(ManifestError, match=r"age \(column 'age_group'\)"):
        dm.setup("fit")


def test_dropped_csv_column_names_the_task(copied_root, augment):
    rows = read_csv(copied_root)
    for row in rows:
        del row["tone"]
    write_csv(copied_root, rows)
    with pytest.raises(ManifestError, match=r"tone \(column 'tone'\)"):
        make_dm(copied_root, augment).setup("fit")


@pytest.mark.parametrize(
    ("value", "match"),
    [("10", r"out of range"), ("monk_11", r"unknown class 'monk_11'"), ("2.5", r"out of range")],
)
def test_bad_class_label_names_the_row(copied_root, augment, value, match):
    rows = read_csv(copied_root)
    victim = next(i for i, r in enumerate(rows) if r["tone"])
    rows[victim]["tone"] = value
    write_csv(copied_root, rows)
    line = victim + 2  # the header is line 1
    with pytest.raises(ManifestError, match=rf"row {line} \(.*\), column tone: .*{match}"):
        make_dm(copied_root, augment).setup("fit")


def test_class_names_and_indices_both_parse(copied_root):
    rows = read_csv(copied_root)
    labeled = [i for i, r in enumerate(rows) if r["blur"]]
    rows[labeled[0]]["blur"] = "2"  # index form of 'strong'
    rows[labeled[1]]["blur"] = "slight"
    write_csv(copied_root, rows)
    tasks = parse_tasks(load_tasks_config("default"))
    samples = {s.row: s for s in load_manifest(copied_root, tasks)}
    assert samples[labeled[0] + 2].labels["blur"] == 2
    assert samples[labeled[1] + 2].labels["blur"] == 1


def _shrink_a_mask(root: Path) -> tuple[int, Path]:
    """Rewrites the skin mask of the first train row with one at half size."""
    rows = read_csv(root)
    victim = next(i for i, r in enumerate(rows) if r["skin_mask"] and r["split"] == "train")
    path = root / rows[victim]["skin_mask"]
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    small = cv2.resize(mask, (mask.shape[1] // 2, mask.shape[0] // 2))
    assert cv2.imwrite(str(path), small)
    return victim + 2, path


def test_mask_size_mismatch_raises_naming_the_file_when_loaded(copied_root, augment):
    line, path = _shrink_a_mask(copied_root)
    tasks = parse_tasks(load_tasks_config("default"))
    samples = load_manifest(copied_root, tasks, splits=["train"])  # the csv itself is fine
    index = next(i for i, s in enumerate(samples) if s.row == line)
    dataset = MultiTaskDataset(samples, tasks, build_finetune_transform(augment, 32, train=False))
    dataset[(index + 1) % len(dataset)]  # other samples load
    with pytest.raises(BadSampleError) as info:
        dataset[index]
    message = str(info.value)
    assert str(path) in message
    assert f"row {line}" in message
    assert "32x32 (WxH) but its image is 64x64" in message
    assert info.value.path == path


def test_mask_size_mismatch_is_skipped_and_reported_under_skip(copied_root, augment):
    line, path = _shrink_a_mask(copied_root)
    tasks = parse_tasks(load_tasks_config("default"))
    samples = load_manifest(copied_root, tasks, splits=["train"])
    index = next(i for i, s in enumerate(samples) if s.row == line)
    dataset = MultiTaskDataset(
        samples, tasks, build_finetune_transform(augment, 32, train=False), on_bad_sample="skip"
    )
    marker = dataset[index]
    assert set(marker) == {BAD_SAMPLE_KEY}
    assert str(path) in marker[BAD_SAMPLE_KEY] and f"row {line}" in marker[BAD_SAMPLE_KEY]
    good = [dataset[(index + k) % len(dataset)] for k in (1, 2)]
    batch = collate_samples([good[0], marker, good[1]])
    assert batch["bad_samples"] == [marker[BAD_SAMPLE_KEY]]
    assert batch["image"].shape == (2, 3, 32, 32)
    assert batch["present"]["skin"].shape == (2,)
    # A batch of nothing but bad samples has no image, only the report.
    assert collate_samples([marker]) == {"bad_samples": [marker[BAD_SAMPLE_KEY]]}


def test_mask_size_mismatch_surfaces_through_the_datamodule(copied_root, augment):
    _, path = _shrink_a_mask(copied_root)
    dm = make_dm(copied_root, augment)
    dm.setup("fit")  # the csv is valid: the problem is in a file, found when it is read
    dm.trainer = fake_trainer()
    with pytest.raises(BadSampleError, match=path.name):
        for _ in dm.train_dataloader():
            pass
    dm = make_dm(copied_root, augment, on_bad_sample="skip")
    dm.setup("fit")
    dm.trainer = fake_trainer()
    reported = [line for b in dm.train_dataloader() for line in b["bad_samples"]]
    assert len(reported) == 1 and path.name in reported[0]


def test_mask_with_wrong_channels_is_a_bad_sample(copied_root, augment):
    rows = read_csv(copied_root)
    victim = next(i for i, r in enumerate(rows) if r["scalp_mask"] and r["split"] == "train")
    path = copied_root / rows[victim]["scalp_mask"]
    cv2.imwrite(str(path), np.zeros((64, 64, 3), np.uint8))
    tasks = parse_tasks(load_tasks_config("default"))
    samples = load_manifest(copied_root, tasks, splits=["train"])
    index = next(i for i, s in enumerate(samples) if s.row == victim + 2)
    dataset = MultiTaskDataset(samples, tasks, build_finetune_transform(augment, 32, train=False))
    with pytest.raises(BadSampleError, match="single-channel"):
        dataset[index]


def test_eval_loaders_under_ddp_hold_every_sample_exactly_once(synthetic_root, augment):
    shards = []
    for rank in (0, 1):
        dm = make_dm(synthetic_root, augment)
        dm.setup("fit")
        dm.trainer = fake_trainer(world_size=2, rank=rank)
        shards.append([int(i) for b in dm.val_dataloader()[0] for i in b["index"]])
    n = len(dm.samples["val"])
    assert n % 2 == 1, "an odd val split shows DistributedSampler's padding"
    assert sorted(shards[0] + shards[1]) == list(range(n))  # no repeat, none missing
    assert {len(s) for s in shards} == {n // 2, n // 2 + 1}


def test_eval_split_smaller_than_the_world_is_refused(synthetic_root, augment):
    dm = make_dm(synthetic_root, augment)
    dm.setup("fit")
    dm.trainer = fake_trainer(world_size=len(dm.samples["val"]) + 1)
    with pytest.raises(ValueError, match=r"samples in split 'val' over \d+ devices"):
        dm.val_dataloader()


@pytest.mark.parametrize("accumulate", [1, 2, 3])
def test_window_label_counts_match_the_batches_the_loader_yields(
    synthetic_root, augment, accumulate
):
    names = ["tone", "skin", "relevance"]
    for rank in (0, 1):
        dm = make_dm(synthetic_root, augment)
        dm.setup("fit")
        dm.trainer = fake_trainer(epoch=1, world_size=2, rank=rank)
        flags = [torch.stack([b["present"][n].sum() for n in names]) for b in dm.train_dataloader()]
        assert len(flags) == 5  # 41 train images, 20 per rank, batches of 4
        for batch_idx in range(len(flags)):
            window = batch_idx // accumulate
            expected = sum(flags[window * accumulate : (window + 1) * accumulate])
            counts = dm.train_label_counts(batch_idx, accumulate, names)
            assert counts.tolist() == expected.float().tolist(), (rank, batch_idx)
