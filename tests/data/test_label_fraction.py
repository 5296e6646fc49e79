"""data.label_fraction: a nested, seed-independent subset of each task's training labels."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ssl_mt.config import CONF_DIR, load_tasks_config
from ssl_mt.data.datamodules import MultiTaskDataModule
from ssl_mt.data.label_fraction import keep_label_fraction
from ssl_mt.data.manifest import Sample

TASKS = load_tasks_config("default")


def make_dm(root: Path, **kwargs) -> MultiTaskDataModule:
    settings = {
        "root": str(root),
        "tasks": TASKS,
        "stages": [{"size": 32, "epochs": 1, "batch_size": 2}],
        "eval_sizes": [32],
        "eval_batch_size": 4,
        "augment": OmegaConf.load(CONF_DIR / "augment" / "finetune.yaml"),
        "num_workers": 0,
        "pin_memory": False,
        "persistent_workers": False,
    }
    settings.update(kwargs)
    dm = MultiTaskDataModule(**settings)
    dm.setup("fit")
    return dm


def labeled(dm: MultiTaskDataModule, task: str) -> set[Path]:
    return {s.image for s in dm.samples["train"] if s.labels[task] is not None}


def test_subsets_are_nested_and_independent_of_the_run_seed(synthetic_root: Path) -> None:
    full = make_dm(synthetic_root)
    half = make_dm(synthetic_root, label_fraction=0.5, seed=0)
    half_other_run = make_dm(synthetic_root, label_fraction=0.5, seed=7)
    quarter = make_dm(synthetic_root, label_fraction=0.25, seed=3)
    for task in TASKS:
        assert labeled(half, task) == labeled(half_other_run, task), task
        assert labeled(quarter, task) <= labeled(half, task) <= labeled(full, task), task
        n = len(labeled(full, task))
        assert len(labeled(half, task)) == max(1, round(0.5 * n)), task
        assert half.label_counts[task].labeled == n
    # Validation keeps every label: all runs are scored on the same images.
    assert [s.labels for s in half.samples["val"]] == [s.labels for s in full.samples["val"]]


def test_another_label_seed_draws_another_subset(synthetic_root: Path) -> None:
    one = make_dm(synthetic_root, label_fraction=0.25, label_seed=0)
    two = make_dm(synthetic_root, label_fraction=0.25, label_seed=1)
    assert any(labeled(one, t) != labeled(two, t) for t in TASKS)


def test_images_without_any_label_are_left_out_and_counts_logged(
    synthetic_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    full = make_dm(synthetic_root)
    with caplog.at_level(logging.INFO, logger="ssl_mt.data.datamodules"):
        few = make_dm(synthetic_root, label_fraction=0.1)
    assert all(any(v is not None for v in s.labels.values()) for s in few.samples["train"])
    assert len(few.samples["train"]) < len(full.samples["train"])
    assert few.num_train_samples == len(few.samples["train"])
    message = "\n".join(r.getMessage() for r in caplog.records)
    counts = few.label_counts["blur"]
    assert f"blur {counts.kept}/{counts.labeled}" in message
    dropped = len(full.samples["train"]) - len(few.samples["train"])
    assert f"{dropped} train image(s) without any label" in message


def test_the_ranking_does_not_depend_on_where_the_data_lies(tmp_path: Path) -> None:
    def samples(root: Path) -> list[Sample]:
        return [
            Sample(image=root / f"images/{i:03d}.jpg", split="train", row=i + 2, labels={"t": 0})
            for i in range(40)
        ]

    tasks = [type("T", (), {"name": "t"})()]
    kept = []
    for root in (tmp_path / "a", tmp_path / "elsewhere" / "b"):
        thinned, counts = keep_label_fraction(samples(root), tasks, 0.2, seed=0, root=root)
        kept.append([i for i, s in enumerate(thinned) if s.labels["t"] is not None])
        assert counts["t"].kept == 8
    assert kept[0] == kept[1]


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5])
def test_a_fraction_outside_0_1_is_refused(synthetic_root: Path, fraction: float) -> None:
    with pytest.raises(ValueError, match=r"data\.label_fraction"):
        make_dm(synthetic_root, label_fraction=fraction)
