"""Datasets over the manifest: aligned targets, presence flags, seeded views, bad samples."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

import ssl_mt.data.datasets as datasets_module
from ssl_mt.config import load_group
from ssl_mt.data.datasets import (
    BAD_SAMPLE_KEY,
    EpochIndexSampler,
    MultiTaskDataset,
    MultiViewDataset,
    collate_samples,
)
from ssl_mt.data.image_io import BadSampleError, write_png
from ssl_mt.data.manifest import list_image_folder, load_manifest
from ssl_mt.data.transforms import build_finetune_transform, build_ssl_view_transform


def augment_config(name: str):
    return load_group("augment", name)


def to_rgb(tensor: torch.Tensor, cfg) -> np.ndarray:
    mean, std = np.array(cfg["mean"]), np.array(cfg["std"])
    return (tensor.numpy().transpose(1, 2, 0) * std + mean) * 255.0


def f_shape(height: int, width: int) -> np.ndarray:
    """A filled letter F (no symmetry)."""
    mask = np.zeros((height, width), np.uint8)
    mask[int(0.1 * height) : int(0.9 * height), int(0.1 * width) : int(0.35 * width)] = 1
    mask[int(0.1 * height) : int(0.3 * height), int(0.35 * width) : int(0.85 * width)] = 1
    mask[int(0.45 * height) : int(0.62 * height), int(0.35 * width) : int(0.65 * width)] = 1
    return mask


def corner(height: int, width: int) -> np.ndarray:
    """A triangle in the lower-right corner."""
    yy, xx = np.mgrid[:height, :width] + 0.5
    return (xx / width + yy / height > 1.1).astype(np.uint8)


@pytest.fixture
def painted_root(tmp_path: Path) -> Path:
    """Images whose red channel is 255 exactly on the skin mask, green on the scalp mask.

    Row 4 has no scalp mask, row 5 no mask at all and no classification label.
    """
    sizes = [(60, 80), (80, 56), (64, 64), (50, 90)]
    rows = []
    for i, (h, w) in enumerate(sizes):
        skin, scalp = f_shape(h, w), corner(h, w)
        image = np.zeros((h, w, 3), np.uint8)
        image[..., 0] = 255 * skin
        image[..., 1] = 255 * scalp
        image[..., 2] = 60
        write_png(tmp_path / f"images/{i}.png", image)
        write_png(tmp_path / f"masks/{i}_skin.png", skin * 255)
        write_png(tmp_path / f"masks/{i}_scalp.png", scalp)  # values 0/1 work too
        scalp_cell = f"masks/{i}_scalp.png" if i != 2 else ""
        rows.append(f"images/{i}.png,train,masks/{i}_skin.png,{scalp_cell},sharp,{i},relevant")
    write_png(tmp_path / "images/4.png", np.full((40, 40, 3), 128, np.uint8))
    rows.append("images/4.png,val,,,,,")
    header = "image,split,skin_mask,scalp_mask,blur,tone,relevance"
    (tmp_path / "labels.csv").write_text("\n".join([header, *rows]) + "\n")
    return tmp_path


def iou(a: np.ndarray, b: np.ndarray) -> float | None:
    union = (a | b).sum()
    return None if union == 0 else float((a & b).sum() / union)


# --------------------------------------------------------------------------- MultiTaskDataset


def test_masks_stay_aligned_through_the_dataset(painted_root: Path, default_tasks) -> None:
    cfg = augment_config("finetune")
    samples = load_manifest(painted_root, default_tasks, splits=["train"])
    assert len(samples) == 4
    dataset = MultiTaskDataset(
        samples, default_tasks, build_finetune_transform(cfg, 48, train=True), seed=3
    )
    check_dataset_alignment(dataset, cfg, epochs=25)


@pytest.fixture
def painted_jpeg_root(painted_root: Path) -> Path:
    """The painted dataset with its images as 5x larger 4:4:4 JPEGs, masks as PNGs."""
    table = (painted_root / "labels.csv").read_text().replace(".png,train", ".jpg,train")
    for i in range(4):
        skin = cv2.imread(str(painted_root / f"masks/{i}_skin.png"), cv2.IMREAD_UNCHANGED)
        h, w = skin.shape
        skin, scalp = f_shape(5 * h + 3, 5 * w + 1), corner(5 * h + 3, 5 * w + 1)
        image = np.zeros((*skin.shape, 3), np.uint8)
        image[..., 0], image[..., 1], image[..., 2] = 255 * skin, 255 * scalp, 60
        encoded = cv2.imencode(
            ".jpg",
            cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
            [cv2.IMWRITE_JPEG_QUALITY, 95, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, 0x111111],
        )[1]
        (painted_root / f"images/{i}.jpg").write_bytes(encoded.tobytes())
        write_png(painted_root / f"masks/{i}_skin.png", skin * 255)
        write_png(painted_root / f"masks/{i}_scalp.png", scalp)
    (painted_root / "labels.csv").write_text(table)
    return painted_root


@pytest.mark.parametrize("train", [True, False])
def test_masks_stay_aligned_with_reduced_jpeg_decoding(
    painted_jpeg_root: Path, default_tasks, monkeypatch, train: bool
) -> None:
    """The known-pattern test on JPEGs 4x larger than a 48 px crop needs: decoded at 1/4."""
    factors: list[int | None] = []
    real = datasets_module.read_reduced_jpeg

    def spy(path, reduction_for):
        result = real(path, reduction_for)
        factors.append(None if result is None else result.factor)
        return result

    monkeypatch.setattr(datasets_module, "read_reduced_jpeg", spy)
    cfg = augment_config("finetune")
    samples = load_manifest(painted_jpeg_root, default_tasks, splits=["train"])
    transform = build_finetune_transform(cfg, 48, train=train)
    dataset = MultiTaskDataset(samples, default_tasks, transform, seed=3)
    check_dataset_alignment(dataset, cfg, epochs=25 if train else 1)
    assert set(factors) == {4}, set(factors)


def check_dataset_alignment(dataset: MultiTaskDataset, cfg, epochs: int) -> None:
    """Each painted channel of every item, thresholded, matches its target mask."""
    scores: dict[str, list[float]] = {"skin": [], "scalp": []}
    for epoch in range(epochs):
        for index in range(len(dataset)):
            item = dataset[(epoch, index)]
            rgb = to_rgb(item["image"], cfg)
            for channel, task in enumerate(("skin", "scalp")):
                target = item["target"][task]
                assert target.shape == (1, 48, 48)
                assert target.dtype == torch.float32
                if not item["present"][task]:
                    assert index == 2 and task == "scalp"
                    assert target.sum() == 0
                    continue
                score = iou(rgb[..., channel] > 127.5, target[0].numpy() > 0.5)
                if score is not None:
                    scores[task].append(score)
    for task, values in scores.items():
        assert len(values) > 2.4 * epochs, task
        assert min(values) > 0.9, (task, sorted(values)[:5])
        assert np.mean(values) > 0.95, (task, np.mean(values))


def test_items_presence_and_targets(synthetic_root: Path, default_tasks) -> None:
    cfg = augment_config("finetune")
    table = pd.read_csv(synthetic_root / "labels.csv", dtype=str, keep_default_na=False)
    samples = load_manifest(synthetic_root, default_tasks)
    dataset = MultiTaskDataset(samples, default_tasks, build_finetune_transform(cfg, 32, False))
    assert len(dataset) == len(table) == 48
    counts = dict.fromkeys((t.name for t in default_tasks), 0)
    for index in range(len(dataset)):
        item = dataset[index]
        row = table.iloc[index]
        assert samples[index].image.name == Path(row["image"]).name
        assert item["index"] == index
        assert item["image"].shape == (3, 32, 32)
        assert item["image"].dtype == torch.float32
        assert set(item["present"]) == set(item["target"]) == {t.name for t in default_tasks}
        for task in default_tasks:
            labeled = row[task.column] != ""
            present = item["present"][task.name]
            assert present.dtype == torch.bool and present.shape == ()
            assert bool(present) == labeled, (index, task.name)
            counts[task.name] += labeled
            target = item["target"][task.name]
            if task.is_segmentation:
                assert target.shape == (1, 32, 32)
                assert target.dtype == torch.float32
                assert set(target.unique().tolist()) <= {0.0, 1.0}
                if not labeled:
                    assert target.sum() == 0
            else:
                assert target.shape == ()
                assert target.dtype == torch.int64
                expected = task.class_index(row[task.column]) if labeled else -1
                assert int(target) == expected
    # The synthetic data mixes labeled and unlabeled cells for every task.
    assert all(0 < n < 48 for n in counts.values()), counts
    # Some masks have foreground at 32 px.
    skin = [dataset[i]["target"]["skin"].sum() for i in range(8) if dataset[i]["present"]["skin"]]
    assert any(s > 0 for s in skin)


def test_dataset_views_are_seeded_by_epoch_and_index(synthetic_root: Path, default_tasks) -> None:
    cfg = augment_config("finetune")
    samples = load_manifest(synthetic_root, default_tasks)[:4]
    dataset = MultiTaskDataset(samples, default_tasks, build_finetune_transform(cfg, 32, True))
    first = dataset[(1, 2)]
    again = dataset[(1, 2)]
    other_epoch = dataset[(2, 2)]
    assert torch.equal(first["image"], again["image"])
    assert all(torch.equal(first["target"][k], again["target"][k]) for k in first["target"])
    assert not torch.equal(first["image"], other_epoch["image"])
    assert torch.equal(dataset[3]["image"], dataset[(0, 3)]["image"])
    other_seed = MultiTaskDataset(
        samples, default_tasks, build_finetune_transform(cfg, 32, True), seed=1
    )
    assert not torch.equal(other_seed[(1, 2)]["image"], first["image"])


def test_classification_only_tasks(synthetic_root: Path, default_tasks) -> None:
    tasks = [t for t in default_tasks if not t.is_segmentation]
    samples = load_manifest(synthetic_root, tasks)[:3]
    cfg = augment_config("finetune")
    item = MultiTaskDataset(samples, tasks, build_finetune_transform(cfg, 32, True))[0]
    assert set(item["target"]) == {"blur", "tone", "relevance"}
    assert item["image"].shape == (3, 32, 32)


def test_bad_samples_raise_or_are_marked(painted_root: Path, default_tasks) -> None:
    cfg = augment_config("finetune")
    (painted_root / "images/1.png").unlink()
    write_png(painted_root / "masks/3_skin.png", np.zeros((10, 10), np.uint8))  # wrong size
    samples = load_manifest(painted_root, default_tasks)
    transform = build_finetune_transform(cfg, 32, train=False)

    strict = MultiTaskDataset(samples, default_tasks, transform)
    with pytest.raises(BadSampleError, match="image not found") as info:
        strict[1]
    assert "labels.csv row 3" in str(info.value)
    assert info.value.path == painted_root / "images/1.png"
    with pytest.raises(BadSampleError, match=r"10x10 \(WxH\) but its image is 90x50"):
        strict[3]

    lenient = MultiTaskDataset(samples, default_tasks, transform, on_bad_sample="skip")
    marker = lenient[1]
    assert set(marker) == {BAD_SAMPLE_KEY}
    assert "labels.csv row 3" in marker[BAD_SAMPLE_KEY]
    assert "1.png" in marker[BAD_SAMPLE_KEY]
    assert "3_skin.png" in lenient[3][BAD_SAMPLE_KEY]
    assert "image" in lenient[0]

    with pytest.raises(ValueError, match="on_bad_sample"):
        MultiTaskDataset(samples, default_tasks, transform, on_bad_sample="ignore")


# --------------------------------------------------------------------------- collation


def test_collate_sets_bad_samples_aside(painted_root: Path, default_tasks) -> None:
    cfg = augment_config("finetune")
    (painted_root / "images/1.png").unlink()
    samples = load_manifest(painted_root, default_tasks)
    dataset = MultiTaskDataset(
        samples, default_tasks, build_finetune_transform(cfg, 32, True), on_bad_sample="skip"
    )
    batch = collate_samples([dataset[i] for i in range(5)])
    assert batch["image"].shape == (4, 3, 32, 32)
    assert batch["index"].tolist() == [0, 2, 3, 4]
    assert batch["target"]["skin"].shape == (4, 1, 32, 32)
    assert batch["target"]["tone"].tolist() == [0, 2, 3, -1]
    assert batch["present"]["scalp"].tolist() == [True, False, True, False]
    assert batch["present"]["blur"].dtype == torch.bool
    assert len(batch["bad_samples"]) == 1
    assert "row 3" in batch["bad_samples"][0]

    only_bad = collate_samples([{BAD_SAMPLE_KEY: "x"}, {BAD_SAMPLE_KEY: "y"}])
    assert only_bad == {"bad_samples": ["x", "y"]}
    assert collate_samples([dataset[0]])["bad_samples"] == []


def test_dataloader_with_epoch_index_sampler(painted_root: Path, default_tasks) -> None:
    cfg = augment_config("finetune")
    samples = load_manifest(painted_root, default_tasks)
    dataset = MultiTaskDataset(samples, default_tasks, build_finetune_transform(cfg, 32, True))
    sampler = EpochIndexSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=2, sampler=sampler, collate_fn=collate_samples)

    def run(epoch: int) -> tuple[list[int], torch.Tensor]:
        sampler.set_epoch(epoch)
        batches = list(loader)
        assert all(b["bad_samples"] == [] for b in batches)
        indices = [i for b in batches for i in b["index"].tolist()]
        images = torch.cat([b["image"] for b in batches])
        return indices, images

    assert next(iter(sampler))[0] == 0
    sampler.set_epoch(5)
    assert all(key[0] == 5 for key in sampler)
    order, images = run(1)
    assert sorted(order) == list(range(5))
    order_again, images_again = run(1)
    assert order_again == order
    assert torch.equal(images_again, images)
    _, images_other = run(2)
    assert not torch.equal(images_other, images)


# --------------------------------------------------------------------------- MultiViewDataset


@pytest.fixture
def image_folder(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    for i in range(3):
        write_png(
            tmp_path / f"imgs/sub{i % 2}/{i}.png", rng.integers(0, 256, (40, 48, 3), np.uint8)
        )
    return list_image_folder(tmp_path / "imgs")


def test_multiview_two_views_one_decode(image_folder, monkeypatch) -> None:
    cfg = augment_config("simclr")
    calls: list[Path] = []
    real_read = datasets_module.read_image

    def spy(path):
        calls.append(Path(path))
        return real_read(path)

    monkeypatch.setattr(datasets_module, "read_image", spy)
    transform = build_ssl_view_transform(cfg, 32)
    dataset = MultiViewDataset(image_folder, [transform, transform], seed=0)
    assert len(dataset) == 3

    item = dataset[(0, 1)]
    assert calls == [image_folder[1]]
    assert item["index"] == 1
    assert len(item["views"]) == 2
    first, second = item["views"]
    assert first.shape == second.shape == (3, 32, 32)
    assert not torch.equal(first, second)

    again = dataset[(0, 1)]
    assert len(calls) == 2
    assert all(torch.equal(a, b) for a, b in zip(item["views"], again["views"], strict=True))
    later = dataset[(1, 1)]
    assert not torch.equal(later["views"][0], first)
    assert not torch.equal(later["views"][1], second)

    batch = collate_samples([dataset[(0, i)] for i in range(3)])
    assert len(batch["views"]) == 2
    assert batch["views"][0].shape == (3, 3, 32, 32)
    assert len(calls) == 6


def test_multiview_bad_image(image_folder, tmp_path: Path) -> None:
    cfg = augment_config("skin")
    images = [*image_folder, tmp_path / "missing.png"]
    transforms = [build_ssl_view_transform(cfg, 32)] * 2
    with pytest.raises(BadSampleError, match=r"missing\.png"):
        MultiViewDataset(images, transforms)[3]
    marker = MultiViewDataset(images, transforms, on_bad_sample="skip")[3]
    assert "missing.png" in marker[BAD_SAMPLE_KEY]
    with pytest.raises(ValueError, match="at least one view"):
        MultiViewDataset(images, [])
