"""The SimCLR LightningModule: loss, optimiser built on the global batch, bounded memory."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from timm.optim import Lars
from torch.utils.data import DataLoader

from ssl_mt.config import load_group, load_tasks_config
from ssl_mt.data.datamodules import SSLDataModule
from ssl_mt.losses.nt_xent import nt_xent_logits, nt_xent_loss
from ssl_mt.models.simclr import SimCLRModule
from tests.helpers import bare_trainer

LARS = {
    "name": "lars",
    "base_lr": 0.3,
    "lr_scaling": "linear",
    "reference_batch": 256,
    "weight_decay": 1e-6,
    "momentum": 0.9,
    "trust_coeff": 0.001,
    "warmup_epochs": 1,
    "min_lr_ratio": 0.0,
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core CPU: one thread avoids oversubscription stalls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_module(**overrides) -> SimCLRModule:
    kwargs = {
        "projection": {"hidden_dim": 32, "out_dim": 16},
        "temperature": 0.2,
        "backbone": {"name": "test_efficientnet"},
        "optim": LARS,
        "knn": {"k": 5, "temperature": 0.07},
        "channels_last": False,
        **overrides,
    }
    torch.manual_seed(0)
    return SimCLRModule(**kwargs)


def make_datamodule(root: Path, stages: list[dict], eval_size: int = 32) -> SSLDataModule:
    return SSLDataModule(
        root=str(root),
        stages=stages,
        eval_sizes=[eval_size],
        augment=load_group("augment", "skin"),
        tasks=load_tasks_config("default"),
        knn_tasks=["tone", "relevance"],
        num_workers=0,
        pin_memory=False,
        eval_batch_size=16,
    )


def test_loss_is_nt_xent_of_the_projected_views():
    """Against embeddings computed here from both views: catches a step that encodes one
    view twice (``z`` of its own would agree with any such loss)."""
    module = make_module()
    gen = torch.Generator().manual_seed(0)
    views = [torch.randn(4, 3, 32, 32, generator=gen) for _ in range(2)]
    with torch.no_grad():  # train mode: BatchNorm normalises over the 8 images, as the step
        expected_z = module.projector(module.features(torch.cat(views)))
    loss, z, extra = module.ssl_step(views)
    assert z.shape == (8, 16)
    torch.testing.assert_close(z.detach(), expected_z)
    torch.testing.assert_close(loss.detach(), nt_xent_loss(expected_z[:4], expected_z[4:], 0.2))
    logits, targets = nt_xent_logits(expected_z[:4], expected_z[4:], 0.2)
    top1 = (logits.argmax(dim=1) == targets).float().mean()
    assert extra["contrastive_top1"].item() == top1.item()
    loss.backward()
    assert module.backbone.conv_stem.weight.grad.abs().sum() > 0


def test_ssl_step_needs_two_views():
    with pytest.raises(ValueError, match=r"SimCLR takes 2 views per image, got 3"):
        make_module().ssl_step([torch.randn(2, 3, 32, 32)] * 3)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_temperature_must_be_positive(temperature: float):
    with pytest.raises(ValueError, match=r"temperature must be > 0, got"):
        make_module(temperature=temperature)


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(ValueError, match=r"'efficientnet_b5x'.*Did you mean: .*efficientnet_b5"):
        make_module(backbone={"name": "efficientnet_b5x"})


def test_configure_optimizers_is_lars_on_the_global_batch(synthetic_root: Path):
    datamodule = make_datamodule(synthetic_root, [{"size": 64, "epochs": 10, "batch_size": 4}])
    datamodule.setup()
    module = make_module()
    # 4 processes x 4 images x 2 accumulated batches: a global batch of 32.
    module.trainer = SimpleNamespace(datamodule=datamodule, world_size=4, accumulate_grad_batches=2)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, Lars)
    assert config["lr_scheduler"]["interval"] == "step"
    for group in optimizer.param_groups:
        assert group["initial_lr"] == pytest.approx(0.3 * 32 / 256)
        if group["weight_decay"] == 0:
            assert all(p.ndim <= 1 for p in group["params"])
        else:
            assert group["weight_decay"] == 1e-6
            assert all(p.ndim >= 2 for p in group["params"])
    in_groups = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(in_groups) == sorted(id(p) for p in module.parameters() if p.requires_grad)
    one_d = {id(p) for p in module.parameters() if p.ndim <= 1}
    no_decay = {
        id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]
    }
    assert one_d == no_decay
    assert {g["tag"] for g in optimizer.param_groups} == {"backbone", "head"}
    steps = datamodule.schedule.optimizer_steps(datamodule.num_train_samples, 4, 2)
    assert scheduler.lr_lambdas[0].total_steps == max(1, sum(steps))


class MemoryWatch(L.Callback):
    """Records what the module holds during and after each validation epoch."""

    def __init__(self) -> None:
        self.peak: list[int] = []
        self.at_val_start: list[int] = []
        self.after_epoch: list[list[int]] = []
        self.updates_at_epoch_start: list[int] = []
        self.containers: list[dict[str, int]] = []

    @staticmethod
    def held(module: SimCLRModule) -> int:
        return sum(len(x) for x in module._knn_features) + sum(len(x) for x in module._knn_labels)

    def on_train_epoch_start(self, trainer, module) -> None:
        self.updates_at_epoch_start.append(module.train_loss._update_count)

    def on_validation_epoch_start(self, trainer, module) -> None:
        self.at_val_start.append(self.held(module))
        self.peak.append(0)

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        assert outputs is None  # validation_step returns nothing to keep
        self.peak[-1] = max(self.peak[-1], self.held(module))

    def on_train_epoch_end(self, trainer, module) -> None:
        self.after_epoch.append([len(x) for x in (*module._knn_features, *module._knn_labels)])
        self.containers.append(
            {
                name: len(value)
                for name, value in vars(module).items()
                if isinstance(value, list | dict | tuple | set)
            }
        )


@pytest.mark.slow
def test_nothing_grows_with_epochs(synthetic_root: Path, tmp_path: Path):
    datamodule = make_datamodule(synthetic_root, [{"size": 32, "epochs": 3, "batch_size": 8}])
    module = make_module()
    watch = MemoryWatch()
    trainer = bare_trainer(
        tmp_path,
        max_epochs=3,
        limit_train_batches=2,
        callbacks=[watch],
    )
    trainer.fit(module, datamodule=datamodule)

    assert trainer.global_step == 3 * 2
    assert "knn/relevance/top1" in trainer.logged_metrics  # the monitor did run
    assert watch.peak[0] > 0  # ...and filled its buffers during validation
    assert watch.peak == [watch.peak[0]] * 3  # the same each epoch: no accumulation
    assert watch.at_val_start == [0, 0, 0]
    assert watch.after_epoch == [[0, 0, 0, 0]] * 3
    assert module._knn_features == [[], []] and module._knn_labels == [[], []]
    assert watch.updates_at_epoch_start == [0, 0, 0]  # epoch metrics are reset
    assert watch.containers[0] == watch.containers[-1]


class _Labeled(torch.utils.data.Dataset):
    """Dark images are one class, bright ones another: any backbone separates them."""

    def __init__(self, dark: list[dict[str, int]], bright: list[dict[str, int]]) -> None:
        gen = torch.Generator().manual_seed(len(dark) + 10 * len(bright))
        self.items = [
            (level + 0.05 * torch.randn(3, 32, 32, generator=gen), target)
            for level, targets in ((-1.5, dark), (1.5, bright))
            for target in targets
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        image, target = self.items[i]
        return {"image": image, "target": {k: torch.tensor(v) for k, v in target.items()}}


class _MonitorData(SSLDataModule):
    """Training views from a real dataset; kNN loaders with labels known to the test."""

    def __init__(self, root: Path, bank: _Labeled, queries: _Labeled) -> None:
        super().__init__(
            root=str(root),
            stages=[{"size": 32, "epochs": 1, "batch_size": 8}],
            eval_sizes=[32],
            augment=load_group("augment", "skin"),
            tasks=load_tasks_config("default"),
            knn_tasks=["tone", "relevance"],
            num_workers=0,
            pin_memory=False,
        )
        self.loaders = [DataLoader(bank, batch_size=7), DataLoader(queries, batch_size=5)]

    def val_dataloader(self) -> list[DataLoader]:
        return self.loaders


def _knn_run(root: Path, tmp_path: Path, queries: _Labeled) -> dict[str, float]:
    bank = _Labeled(
        dark=[{"tone": 2, "relevance": 0}] * 9 + [{"tone": -1, "relevance": 0}] * 3,
        bright=[{"tone": 7, "relevance": 1}] * 12,
    )
    trainer = bare_trainer(tmp_path, max_epochs=1, limit_train_batches=1)
    trainer.fit(make_module(), datamodule=_MonitorData(root, bank, queries))
    return {k: float(v) for k, v in trainer.logged_metrics.items() if k.startswith("knn/")}


def test_knn_monitor_scores_the_features_it_is_given(synthetic_root: Path, tmp_path: Path):
    # Unlabeled (-1) tone queries are left out of the tone accuracy.
    right = _Labeled(
        dark=[{"tone": 2, "relevance": 0}] * 4 + [{"tone": -1, "relevance": 0}] * 4,
        bright=[{"tone": 7, "relevance": 1}] * 6,
    )
    metrics = _knn_run(synthetic_root, tmp_path, right)
    assert metrics["knn/relevance/top1"] == 1.0
    assert metrics["knn/tone/top1"] == 1.0
    # Majority rate: the queries answered with the bank's most frequent class (tone 7: 12
    # of 21 bank labels; relevance is a 12/12 tie, which goes to the lower index, 0).
    assert metrics["knn/tone/majority"] == pytest.approx(6 / 10)
    assert metrics["knn/relevance/majority"] == pytest.approx(8 / 14)

    wrong = _Labeled(
        dark=[{"tone": 7, "relevance": 1}] * 4 + [{"tone": -1, "relevance": 1}] * 4,
        bright=[{"tone": 2, "relevance": 0}] * 6,
    )
    metrics = _knn_run(synthetic_root, tmp_path, wrong)
    assert metrics["knn/relevance/top1"] == 0.0
    assert metrics["knn/tone/top1"] == 0.0
