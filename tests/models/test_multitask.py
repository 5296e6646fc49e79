"""The multi-task LightningModule: outputs, overfitting a batch, backbone freezing and lr scale."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from ssl_mt.config import load_group, load_tasks_config
from ssl_mt.data.datamodules import MultiTaskDataModule
from ssl_mt.data.datasets import MultiTaskDataset, collate_samples
from ssl_mt.data.manifest import load_manifest
from ssl_mt.data.transforms import build_finetune_transform
from ssl_mt.models.multitask import MultiTaskModule
from ssl_mt.schedule import ResolutionSchedule
from ssl_mt.tasks import parse_tasks
from tests.helpers import bare_trainer

DECODER = [64, 32, 16, 16, 8]  # conf/backbone/test_efficientnet.yaml
TASK_NAMES = ("skin", "scalp", "blur", "tone", "relevance")


def optim_cfg(**overrides):
    cfg = load_group("optim", "adamw")
    cfg.base_lr, cfg.lr_scaling, cfg.warmup_epochs = 3e-3, "none", 0
    return OmegaConf.merge(cfg, overrides)


def make_module(optim=None, eval_sizes=(64,), weighting="fixed", **kwargs) -> MultiTaskModule:
    return MultiTaskModule(
        tasks=load_tasks_config("default"),
        backbone={"name": "test_efficientnet", "pretrained": False, "weights": None},
        optim=optim if optim is not None else optim_cfg(),
        weighting={"name": weighting},
        eval_sizes=list(eval_sizes),
        decoder_channels=DECODER,
        channels_last=False,
        **kwargs,
    )


def augment_cfg():
    return load_group("augment", "finetune")


def fixed_batch(root: Path, size: int = 64) -> dict:
    """8 train samples: 5 labeled for every task, 3 irrelevant photos (relevance only, mostly).

    Together they hold labels of every task, and relevance sees both classes.
    """
    tasks = parse_tasks(load_tasks_config("default"))
    samples = load_manifest(root, tasks, splits=["train"])
    complete = [s for s in samples if all(s.labels[t.name] is not None for t in tasks)]
    irrelevant = [s for s in samples if s.labels["relevance"] == 0]
    chosen = complete[:5] + irrelevant[:3]
    assert len(chosen) == 8
    dataset = MultiTaskDataset(
        chosen, tasks, build_finetune_transform(augment_cfg(), size, train=False)
    )
    return collate_samples([dataset[i] for i in range(len(dataset))])


def test_outputs_have_one_entry_per_task_with_the_right_shape():
    module = make_module()
    out = module(torch.randn(2, 3, 64, 64))
    assert set(out) == set(TASK_NAMES)
    assert out["skin"].shape == out["scalp"].shape == (2, 1, 64, 64)
    assert out["blur"].shape == (2, 3)
    assert out["tone"].shape == (2, 10)
    assert out["relevance"].shape == (2, 2)
    assert module.encoder_tensors_loaded == 0


def test_overfitting_one_batch_lowers_every_task_loss(synthetic_root):
    torch.manual_seed(0)
    batch = fixed_batch(synthetic_root)
    for name in TASK_NAMES:
        assert batch["present"][name].any(), f"the batch needs labels of {name}"
    assert set(batch["target"]["relevance"].tolist()) == {0, 1}
    module = make_module()
    module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)

    def losses() -> dict[str, torch.Tensor]:
        return module.task_losses(module(batch["image"]), batch)

    start = {k: v.item() for k, v in losses().items()}
    for _ in range(60):
        step_losses = losses()
        optimizer.zero_grad()
        torch.stack(list(step_losses.values())).sum().backward()
        optimizer.step()
    with torch.no_grad():
        end = {k: v.item() for k, v in losses().items()}
    for name in TASK_NAMES:
        assert end[name] < 0.5 * start[name], f"{name}: {start[name]:.3f} -> {end[name]:.3f}"


def test_a_task_without_labels_in_the_batch_contributes_nothing(synthetic_root):
    batch = fixed_batch(synthetic_root, size=32)
    batch["present"]["tone"] = torch.zeros_like(batch["present"]["tone"])
    module = make_module(eval_sizes=(32,))
    out = module(batch["image"])
    losses = module.task_losses(out, batch)
    assert losses["tone"].item() == 0.0
    present = {k: v.any() for k, v in batch["present"].items()}
    total, _ = module.weighting(losses, present)
    torch.testing.assert_close(total, sum(v for k, v in losses.items() if k != "tone"))
    total.backward()
    tone_head = module.net.heads["tone"].fc
    assert tone_head.weight.grad is not None and torch.all(tone_head.weight.grad == 0)
    assert module.net.heads["blur"].fc.weight.grad.abs().sum() > 0


# -- optimisation: parameter groups, freezing ---------------------------------------------------


def attach_fake_trainer(module: MultiTaskModule, n_train: int = 32) -> None:
    schedule = ResolutionSchedule([{"size": 32, "epochs": 2, "batch_size": 8}])
    module.trainer = SimpleNamespace(
        datamodule=SimpleNamespace(schedule=schedule, num_train_samples=n_train),
        world_size=1,
        accumulate_grad_batches=1,
    )


def test_backbone_lr_scale_gives_the_backbone_groups_a_fraction_of_the_head_lr():
    module = make_module(optim=optim_cfg(backbone_lr_scale=0.1), weighting="uncertainty")
    attach_fake_trainer(module)
    optimizer = module.configure_optimizers()["optimizer"]
    by_tag: dict[str, list[dict]] = {}
    for group in optimizer.param_groups:
        by_tag.setdefault(group["tag"], []).append(group)
    assert set(by_tag) == {"backbone", "head", "weighting"}
    head_lr = {g["lr"] for g in by_tag["head"]}
    assert len(head_lr) == 1
    (head_lr,) = head_lr
    assert head_lr == pytest.approx(3e-3)
    for group in by_tag["backbone"]:
        assert group["lr"] == pytest.approx(0.1 * head_lr)
    # Every trainable parameter is in exactly one group, in the group of its part.
    grouped = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped})
    assert {id(p) for p in grouped} == {id(p) for p in module.parameters() if p.requires_grad}
    encoder = {id(p) for p in module.net.encoder.parameters()}
    assert {id(p) for g in by_tag["backbone"] for p in g["params"]} == encoder
    assert [p for g in by_tag["weighting"] for p in g["params"]] == [module.weighting.log_vars]
    # Biases and norms: no weight decay.
    for group in optimizer.param_groups:
        if any(p.ndim <= 1 for p in group["params"]):
            assert group["weight_decay"] == 0.0


def test_default_backbone_lr_equals_head_lr():
    module = make_module()
    attach_fake_trainer(module)
    optimizer = module.configure_optimizers()["optimizer"]
    assert len({g["lr"] for g in optimizer.param_groups if g["tag"] != "weighting"}) == 1


class _Spy(L.Callback):
    """Records, per epoch, the encoder's mode, the backbone lr and the weights at the end."""

    def __init__(self) -> None:
        self.encoder_training: dict[int, set[bool]] = {}
        self.backbone_lr: dict[int, set[float]] = {}
        self.head_lr: dict[int, set[float]] = {}
        self.state: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        epoch = trainer.current_epoch
        self.encoder_training.setdefault(epoch, set()).add(pl_module.net.encoder.training)
        for group in trainer.optimizers[0].param_groups:
            target = self.backbone_lr if group["tag"] == "backbone" else self.head_lr
            target.setdefault(epoch, set()).add(group["lr"])

    def on_train_epoch_end(self, trainer, pl_module):
        self.state[trainer.current_epoch] = copy.deepcopy(pl_module.net.state_dict())


def test_freeze_backbone_epochs_keeps_the_encoder_fixed_then_trains_it(synthetic_root, tmp_path):
    torch.manual_seed(0)
    module = make_module(optim=optim_cfg(freeze_backbone_epochs=1), eval_sizes=(32,))
    datamodule = MultiTaskDataModule(
        str(synthetic_root),
        load_tasks_config("default"),
        stages=[{"size": 32, "epochs": 2, "batch_size": 8}],
        eval_sizes=[32],
        eval_batch_size=16,
        augment=augment_cfg(),
        num_workers=0,
        pin_memory=False,
        persistent_workers=False,
    )
    spy = _Spy()
    initial = copy.deepcopy(module.net.state_dict())
    trainer = bare_trainer(tmp_path, max_epochs=2, callbacks=[spy])
    trainer.fit(module, datamodule=datamodule)

    encoder_keys = [k for k in initial if k.startswith("encoder.")]
    other_keys = [k for k in initial if not k.startswith("encoder.")]
    assert encoder_keys and other_keys

    # Epoch 0: encoder frozen (weights AND BatchNorm statistics), heads and decoder train.
    assert spy.backbone_lr[0] == {0.0}
    assert all(lr > 0 for lr in spy.head_lr[0])
    assert spy.encoder_training[0] == {False}
    changed = [k for k in encoder_keys if not torch.equal(initial[k], spy.state[0][k])]
    assert changed == [], f"frozen encoder tensors changed: {changed[:5]}"
    heads_changed = [k for k in other_keys if not torch.equal(initial[k], spy.state[0][k])]
    assert any(k.startswith("heads.") for k in heads_changed)
    assert any(k.startswith("decoder.") for k in heads_changed)

    # Epoch 1: the encoder trains, in train mode (its BatchNorm statistics move too).
    assert all(lr > 0 for lr in spy.backbone_lr[1])
    assert spy.encoder_training[1] == {True}
    unchanged = [k for k in encoder_keys if torch.equal(spy.state[0][k], spy.state[1][k])]
    assert unchanged == [], f"encoder tensors that did not train in epoch 1: {unchanged[:5]}"
