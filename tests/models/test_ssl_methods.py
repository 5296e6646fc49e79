"""MoCo v2, BYOL, SimSiam, DINO and RotNet behind the pretraining app.

Per method: the step's loss against its definition, a short run through
``ssl_mt.pretrain.run`` that lowers the loss without collapsing, and a resume from
``last.ckpt`` that restores the momentum network, the queue and the DINO centre bit for bit.
Plus the shared EMA, the multi-crop views and the bad-input errors.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ssl_mt.config import load_group, load_tasks_config
from ssl_mt.data.datamodules import SSLDataModule
from ssl_mt.data.synthetic import generate_dataset
from ssl_mt.data.transforms import ViewSpec
from ssl_mt.losses.byol_loss import byol_loss
from ssl_mt.losses.dino_loss import dino_cross_entropy
from ssl_mt.losses.info_nce import info_nce_logits, info_nce_loss
from ssl_mt.models.byol import BYOLModule
from ssl_mt.models.dino import DINOModule
from ssl_mt.models.ema import MomentumSchedule, ema_update_, momentum_copy
from ssl_mt.models.moco import MoCoModule
from ssl_mt.models.rotation import RotationModule
from ssl_mt.models.simsiam import SimSiamModule
from ssl_mt.pretrain import build_module, run
from ssl_mt.runner import build_trainer
from ssl_mt.schedule import ResolutionSchedule
from tests.helpers import cause_chain, compose_app

EPOCHS = 5
BATCH = 8
BACKBONE = {"name": "test_efficientnet"}
OPTIM = {"name": "adamw", "base_lr": 3e-3, "lr_scaling": "none", "weight_decay": 1e-4}

# Small heads (and test settings where the paper's need long runs), and the size D of the
# embedding each method logs as train/embedding_std (healthy ≈ 1/√D, collapsed → 0).
METHODS = {
    "moco": (
        [
            "method.projection.hidden_dim=64",
            "method.projection.out_dim=32",
            f"method.queue_size={BATCH}",
            # A key encoder that keeps up and a sharper softmax: 50 steps show learning.
            "method.momentum.base=0.9",
            "method.temperature=0.1",
        ],
        32,
    ),
    "byol": (
        [
            "method.projection.hidden_dim=64",
            "method.projection.out_dim=32",
            "method.prediction.hidden_dim=64",
        ],
        32,
    ),
    "simsiam": (
        [
            "method.projection.hidden_dim=64",
            "method.projection.out_dim=64",
            "method.prediction.hidden_dim=16",
        ],
        64,
    ),
    "dino": (
        [
            "method.head.out_dim=256",
            "method.head.hidden_dim=64",
            "method.head.bottleneck_dim=32",
            # BatchNorm in the head (main_dino.py --use_bn_in_head): without it a tiny
            # network on 80 images collapses to the uniform output within a few epochs.
            "method.head.use_bn=true",
            "method.views.local_crops=2",
        ],
        32,
    ),
    # A slow learner at this size: a higher lr from the first step.
    "rotation": (["optim.base_lr=1e-2", "optim.warmup_epochs=0"], 256),  # D: pooled features
}
MOMENTUM_METHODS = ("moco", "byol", "dino")


def quick_cfg(method: str, root: Path, run_dir: Path, *extra: str, epochs: int = EPOCHS):
    return compose_app(
        "pretrain",
        [
            "experiment=quick",
            f"method={method}",
            f"data.root={root}",
            f"run_dir={run_dir}",
            "ckpt_path=null",
            "++trainer.enable_progress_bar=false",
            "data.num_workers=0",
            "data.pin_memory=false",
            f"schedule.stages=[{{size:64,epochs:{epochs},batch_size:{BATCH}}}]",
            "schedule.eval_sizes=[64]",
            "data.knn_tasks=[]",  # no kNN monitor: not what these tests look at
            *METHODS[method][0],
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ssl_methods") / "data"
    return generate_dataset(root, n=96, size=64, seed=3, workers=1, progress=False)


@pytest.fixture(scope="module", params=list(METHODS))
def method_run(request, data_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """One short pretraining run per method: (method, config, run directory)."""
    method = request.param
    run_dir = tmp_path_factory.mktemp(f"run_{method}")
    cfg = quick_cfg(method, data_root, run_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run(cfg) == run_dir
    finally:
        torch.set_num_threads(threads)
    return method, cfg, run_dir


def epoch_values(run_dir: Path, column: str) -> pd.Series:
    frame = pd.read_csv(run_dir / "metrics.csv")
    assert column in frame.columns, f"{column} not logged; columns: {list(frame.columns)}"
    return frame.dropna(subset=[column]).groupby("epoch")[column].last()


# -- short runs ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_short_run_lowers_the_loss_without_collapse(method_run):
    method, _, run_dir = method_run
    loss = epoch_values(run_dir, "train/loss")
    assert list(loss.index) == list(range(EPOCHS))
    assert loss.iloc[-1] < loss.iloc[0], f"{method}: {loss.to_dict()}"
    std = epoch_values(run_dir, "train/embedding_std")
    dim = METHODS[method][1]
    assert std.min() > 0.2 / math.sqrt(dim), f"{method}: {std.to_dict()} (D={dim})"
    for name in ("backbone/model.safetensors", "backbone/config.json", "checkpoints/last.ckpt"):
        assert (run_dir / name).is_file(), name


class Snapshot(L.Callback):
    """The module's state right after the checkpoint restore, and the first EMA momentum."""

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] = {}
        self.start_step = -1
        self.momentum: float | None = None
        self.step_after: int | None = None

    def on_train_start(self, trainer, module) -> None:
        self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        self.start_step = trainer.global_step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.momentum is None and hasattr(module, "current_momentum"):
            self.momentum = module.current_momentum
            self.step_after = trainer.global_step


@pytest.mark.slow
def test_resume_restores_momentum_network_queue_and_centre_exactly(method_run, tmp_path: Path):
    method, cfg, run_dir = method_run
    last = run_dir / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)
    state = saved["state_dict"]

    # A fresh module (other seed): whatever equals the checkpoint below was restored.
    resumed_cfg = quick_cfg(
        method,
        cfg.data.root,
        tmp_path,
        "++trainer.limit_train_batches=1",
        "++trainer.limit_val_batches=0",
        epochs=EPOCHS + 1,
    )
    torch.manual_seed(1234)
    module = build_module(resumed_cfg)
    fresh = {k: v.detach().clone() for k, v in module.state_dict().items()}
    datamodule = instantiate(resumed_cfg.data, _recursive_=False, _convert_="all")
    snapshot = Snapshot()
    trainer = build_trainer(resumed_cfg, callbacks=[snapshot])
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(last))

    assert snapshot.start_step == saved["global_step"] > 0
    assert set(snapshot.state) == set(state)
    for key, tensor in state.items():
        assert torch.equal(snapshot.state[key], tensor), f"{method}: {key} not restored exactly"

    expected = {
        "moco": ["target.backbone.conv_stem.weight", "target.projector.0.weight", "queue.keys"],
        "byol": ["target.backbone.conv_stem.weight", "target.projector.net.0.weight"],
        "dino": ["target.backbone.conv_stem.weight", "target.head.last_layer.weight"],
        "simsiam": ["predictor.net.0.weight"],
        "rotation": ["classifier.weight"],
    }[method]
    for key in expected:
        assert not torch.equal(fresh[key], state[key]), f"{key}: nothing to restore"
    if method == "moco":
        seen = saved["global_step"] * BATCH  # keys enqueued so far (one per image)
        assert state["queue.ptr"].item() == seen % module.queue.size
        assert state["queue.ptr"].dtype == torch.long
    if method == "dino":
        assert state["criterion.center"].abs().sum() > 0
        assert not torch.equal(fresh["criterion.center"], state["criterion.center"])

    if method in MOMENTUM_METHODS:
        # The target is its own state (an EMA), not a copy of the online network ...
        assert not torch.equal(
            state["target.backbone.conv_stem.weight"], state["backbone.conv_stem.weight"]
        )
        # ... and the schedule continues from the restored step, not from 0.
        assert snapshot.step_after == saved["global_step"] + 1
        total = module.total_steps
        assert snapshot.momentum == module.momentum_schedule(saved["global_step"], total)

    # The export is the online network (the student), not the target.
    exported = load_file(str(run_dir / "backbone" / "model.safetensors"))
    for name, tensor in exported.items():
        assert torch.equal(tensor, state[f"backbone.{name}"]), name
    if method in MOMENTUM_METHODS:
        assert not torch.equal(
            exported["conv_stem.weight"], state["target.backbone.conv_stem.weight"]
        )


# -- the shared EMA -----------------------------------------------------------------------------
def test_momentum_schedule_is_a_cosine_from_base_to_final():
    schedule = MomentumSchedule(base=0.996, final=1.0)
    assert schedule(0, 100) == pytest.approx(0.996)
    assert schedule(50, 100) == pytest.approx(0.998)
    assert schedule(100, 100) == pytest.approx(1.0)
    values = [schedule(k, 100) for k in range(101)]
    assert values == sorted(values)
    assert MomentumSchedule(base=0.999, schedule="constant")(70, 100) == 0.999


def test_ema_update_averages_parameters_and_float_buffers_and_copies_counters():
    torch.manual_seed(0)
    online = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    target = momentum_copy(online)
    assert all(not p.requires_grad for p in target.parameters())
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    online(torch.randn(8, 3))  # moves running stats and num_batches_tracked
    before = {k: v.clone() for k, v in target.state_dict().items()}
    ema_update_(target, online, 0.9)
    for key, value in target.state_dict().items():
        new = online.state_dict()[key]
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.9 * before[key] + 0.1 * new, msg=key)
        else:
            assert torch.equal(value, new), key


def test_targets_get_no_optimizer_and_no_gradient():
    module = make_module(BYOLModule, projection=SMALL_PROJ, prediction={"hidden_dim": 16})
    module.trainer = fake_trainer()
    optimizer = module.configure_optimizers()["optimizer"]
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    targets = {id(p) for p in module.target.parameters()}
    assert not in_optimizer & targets
    online = {
        id(p) for m in (module.backbone, module.projector, module.predictor) for p in m.parameters()
    }
    assert online <= in_optimizer
    views = images(2)
    loss, _, _ = module.ssl_step(views)
    loss.backward()
    assert all(p.grad is None for p in module.target.parameters())
    assert module.backbone.conv_stem.weight.grad.abs().sum() > 0


# -- the steps, against their definitions ---------------------------------------------------------
SMALL_PROJ = {"hidden_dim": 32, "out_dim": 16}


def make_module(cls, **kwargs):
    torch.manual_seed(0)
    return cls(backbone=BACKBONE, optim=OPTIM, channels_last=False, **kwargs)


def images(n_views: int, batch: int = 4, size: int = 32, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=gen) for _ in range(n_views)]


def fake_trainer(world_size: int = 1, batch_size: int = 4):
    schedule = ResolutionSchedule([{"size": 32, "epochs": 2, "batch_size": batch_size}])
    return SimpleNamespace(
        datamodule=SimpleNamespace(schedule=schedule, num_train_samples=32),
        world_size=world_size,
        accumulate_grad_batches=1,
    )


def test_moco_step_is_info_nce_against_the_queue_then_enqueues_the_keys():
    module = make_module(MoCoModule, projection=SMALL_PROJ, queue_size=8)
    views = images(2)
    queue_before = module.queue.keys.clone()
    with torch.no_grad():
        keys = module.target["projector"](module.target["backbone"](views[1]))
    loss, q, extra = module.ssl_step(views)
    torch.testing.assert_close(loss, info_nce_loss(q, keys, queue_before, 0.2))
    torch.testing.assert_close(module.queue.keys[:4], F.normalize(keys, dim=1))
    torch.testing.assert_close(module.queue.keys[4:], queue_before[4:])
    assert module.queue.ptr.item() == 4
    logits = info_nce_logits(q.detach(), keys, queue_before, 0.2)
    assert extra["contrastive_top1"].item() == (logits.argmax(dim=1) == 0).float().mean().item()
    loss.backward()  # the queue changed in place after the loss: the graph must not care


def test_byol_step_regresses_the_target_projection_of_the_other_view():
    module = make_module(BYOLModule, projection=SMALL_PROJ, prediction={"hidden_dim": 16})
    views = images(2)
    with torch.no_grad():
        # A different target than the online network, as after some training.
        for p in module.target.parameters():
            p.add_(0.01 * torch.randn_like(p))
        both = torch.cat(views)
        zt = module.target["projector"](module.target["backbone"](both))
    loss, z, _ = module.ssl_step(views)
    p1, p2 = module.predictor(z).chunk(2)
    torch.testing.assert_close(loss, byol_loss(p1, p2, *zt.chunk(2)))


def test_simsiam_step_has_no_momentum_network_and_stops_the_target_gradient():
    """Loss and gradient against the definition with explicitly detached targets: catches a
    target that lets the gradient through (SimSiam collapses without the stop-gradient)."""
    module = make_module(
        SimSiamModule,
        projection={"hidden_dim": 32, "out_dim": 16, "num_layers": 3},
        prediction={"hidden_dim": 8},
    )
    assert not [n for n, _ in module.named_children() if "target" in n]
    reference = copy.deepcopy(module)
    views = images(2)
    loss, z, _ = module.ssl_step(views)
    assert z.shape == (8, 16)
    loss.backward()

    z_ref = reference.projector(reference.features(torch.cat(views)))
    p1, p2 = reference.predictor(z_ref).chunk(2)
    z1, z2 = z_ref.detach().chunk(2)
    expected = -(F.cosine_similarity(p1, z2).mean() + F.cosine_similarity(p2, z1).mean()) / 2
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach())
    grads = dict(module.named_parameters())
    for name, param in reference.named_parameters():
        if param.grad is None:
            assert grads[name].grad is None, name
        else:
            torch.testing.assert_close(grads[name].grad, param.grad, msg=name)
    assert module.projector.net[0].weight.grad.abs().sum() > 0


def test_rotation_step_is_cross_entropy_over_the_four_rotations():
    module = make_module(RotationModule, views={"global_crops": 1})
    (view,) = images(1)
    loss, features, extra = module.ssl_step([view])
    rotated = torch.cat(
        [view, view.transpose(2, 3).flip(2), view.flip(2, 3), view.transpose(2, 3).flip(3)]
    )
    labels = torch.tensor([0] * 4 + [1] * 4 + [2] * 4 + [3] * 4)
    logits = module.classifier(module.features(rotated))
    expected = -logits.log_softmax(dim=1)[torch.arange(16), labels].mean()
    torch.testing.assert_close(loss, expected)
    assert features.shape == (16, module.backbone.num_features)
    top1 = (logits.argmax(dim=1) == labels).float().mean()
    assert extra["rotation_top1"].item() == top1.item()


DINO_VIEWS = {"global_crops": 2, "local_crops": 3, "local_size_ratio": 0.5}


def test_dino_step_distils_the_teacher_on_global_views_into_every_view():
    """Against ``dino_cross_entropy`` of teacher outputs on the 2 global views only and
    student outputs on all 5, with the centre before the step: catches a teacher that also
    sees the local crops, and a centre updated before the loss."""
    module = make_module(
        DINOModule, head={"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16}, views=DINO_VIEWS
    )
    views = images(2, size=32) + images(3, size=16, seed=1)
    center = module.criterion.center.clone()
    with torch.no_grad():
        global_views, local_views = torch.cat(views[:2]), torch.cat(views[2:])
        teacher, _ = module.target["head"](module.target["backbone"](global_views))
        student_global, _ = module.head(module.features(global_views))
        student_local, _ = module.head(module.features(local_views))
        expected = dino_cross_entropy(
            [*student_global.chunk(2), *student_local.chunk(3)],
            teacher.chunk(2),
            center,
            module.criterion.student_temperature,
            module.teacher_temperature_at(0),
        )
    loss, embeddings, extra = module.ssl_step(views)
    assert embeddings.shape == (8, 16)
    torch.testing.assert_close(loss.detach(), expected)
    assert extra["teacher_entropy"].item() > 0
    momentum = module.criterion.center_momentum
    moved = center * momentum + teacher.mean(dim=0, keepdim=True) * (1 - momentum)
    torch.testing.assert_close(module.criterion.center, moved)  # from the teacher outputs
    loss.backward()
    assert module.backbone.conv_stem.weight.grad.abs().sum() > 0


def test_dino_freezes_the_last_layer_during_the_first_epoch():
    module = make_module(
        DINOModule, head={"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16}, views=DINO_VIEWS
    )
    loss, _, _ = module.ssl_step(images(2, size=32) + images(3, size=16, seed=1))
    loss.backward()
    assert module.head.last_layer.weight.grad is not None
    module.on_after_backward()  # epoch 0 < freeze_last_layer_epochs = 1
    assert module.head.last_layer.weight.grad is None
    assert module.head.mlp[0].weight.grad is not None


def test_teacher_temperature_warms_up_linearly_like_np_linspace():
    module = make_module(
        DINOModule,
        head={"out_dim": 16, "hidden_dim": 8, "bottleneck_dim": 8},
        views=DINO_VIEWS,
        warmup_teacher_temperature=0.04,
        teacher_temperature=0.07,
        warmup_teacher_temperature_epochs=4,
    )
    assert [round(module.teacher_temperature_at(e), 6) for e in range(6)] == [
        0.04,
        0.05,
        0.06,
        0.07,
        0.07,
        0.07,
    ]


# -- multi-crop views from the method config ------------------------------------------------------
def test_dino_config_gives_two_global_and_n_local_views(data_root: Path):
    cfg = compose_app("pretrain", ["experiment=quick", "method=dino", f"data.root={data_root}"])
    assert OmegaConf.to_container(cfg.data.views) == OmegaConf.to_container(cfg.method.views)
    views = OmegaConf.to_container(cfg.method.views)
    datamodule = SSLDataModule(
        root=str(data_root),
        stages=[{"size": 64, "epochs": 1, "batch_size": 4}],
        eval_sizes=[64],
        augment=OmegaConf.to_container(load_group("augment", "skin")),
        tasks=load_tasks_config("default"),
        views=views,
        num_workers=0,
        pin_memory=False,
    )
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    sizes = [tuple(v.shape) for v in batch["views"]]
    assert sizes == [(4, 3, 64, 64)] * 2 + [(4, 3, 24, 24)] * views["local_crops"]
    assert ViewSpec.from_config(views).local_size(224) == 96  # DINO's 96 px at 224


def test_methods_without_views_keep_two_alike_views():
    for method in ("simclr", "moco", "byol", "simsiam"):
        cfg = compose_app("pretrain", ["experiment=quick", f"method={method}"])
        assert cfg.data.views is None and cfg.data.n_views == 2, method
    cfg = compose_app("pretrain", ["experiment=quick", "method=rotation"])
    assert ViewSpec.from_config(cfg.data.views).count == 1


# -- bad input ------------------------------------------------------------------------------------
def test_moco_queue_not_divisible_by_the_per_device_batch_fails_at_construction():
    with pytest.raises(
        ValueError, match=r"method\.queue_size=100 must be a multiple of the global batch 16"
    ):
        make_module(MoCoModule, projection=SMALL_PROJ, queue_size=100, batch_size=16)


def test_moco_queue_not_divisible_by_the_global_batch_fails_in_setup():
    module = make_module(MoCoModule, projection=SMALL_PROJ, queue_size=16, batch_size=4)
    module.trainer = fake_trainer(world_size=3, batch_size=4)
    with pytest.raises(
        ValueError,
        match=r"method\.queue_size=16 must be a multiple of the global batch 12 "
        r"\(schedule\.stages\[0\]: batch_size=4 × 3 process\(es\)\)",
    ):
        module.setup("fit")
    module.trainer = fake_trainer(world_size=2, batch_size=4)
    module.setup("fit")  # 16 = 2 × 4 × 2: fine


def test_moco_bad_queue_in_the_app_fails_before_training(data_root: Path, tmp_path: Path):
    cfg = quick_cfg("moco", data_root, tmp_path, "method.queue_size=100")
    with pytest.raises(Exception, match=r"method\.queue_size=100 must be a multiple") as info:
        run(cfg)
    assert any(isinstance(e, ValueError) for e in cause_chain(info.value))
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    ("views", "match"),
    [
        (
            {"global_crops": 2, "local_crops": 0},
            r"method\.views\.local_crops must be >= 1 for DINO",
        ),
        ({"global_crops": 1, "local_crops": 4}, r"method\.views\.global_crops must be 2 for DINO"),
        ({"global_crops": 2, "local_crop": 4}, r"method\.views: unknown key\(s\) \['local_crop'\]"),
        (
            {"global_crops": 2, "local_crops": 2, "local_scale": [0.5, 0.2]},
            r"method\.views\.local_scale",
        ),
    ],
)
def test_dino_bad_views_are_named(views, match):
    with pytest.raises(ValueError, match=match):
        make_module(
            DINOModule, head={"out_dim": 16, "hidden_dim": 8, "bottleneck_dim": 8}, views=views
        )


def test_dino_zero_local_crops_in_the_app_fails_before_training(data_root: Path, tmp_path: Path):
    cfg = quick_cfg("dino", data_root, tmp_path, "method.views.local_crops=0")
    with pytest.raises(Exception, match=r"method\.views\.local_crops must be >= 1") as info:
        run(cfg)
    assert any(isinstance(e, ValueError) for e in cause_chain(info.value))
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("base", [1.0, 1.5, -0.1])
def test_ema_momentum_outside_0_1_is_refused(base: float):
    with pytest.raises(ValueError, match=r"method\.momentum\.base must be in \[0, 1\)"):
        MomentumSchedule(base=base)
    with pytest.raises(ValueError, match=r"method\.momentum\.base must be in \[0, 1\)"):
        make_module(
            BYOLModule, projection=SMALL_PROJ, prediction={"hidden_dim": 8}, momentum={"base": base}
        )


def test_ema_final_below_base_and_unknown_schedule_are_refused():
    with pytest.raises(ValueError, match=r"method\.momentum\.final must be in \[base, 1\]"):
        MomentumSchedule(base=0.99, final=0.9)
    with pytest.raises(ValueError, match=r"method\.momentum\.schedule must be one of"):
        MomentumSchedule(base=0.99, schedule="linear")


def test_rotation_refuses_more_than_one_view():
    with pytest.raises(ValueError, match=r"method\.views must declare 1 view for rotation"):
        make_module(RotationModule, views={"global_crops": 2})


def test_predictor_output_must_match_the_projection():
    with pytest.raises(
        ValueError, match=r"method\.prediction\.out_dim=8 must equal method\.projection\.out_dim=16"
    ):
        make_module(BYOLModule, projection=SMALL_PROJ, prediction={"hidden_dim": 8, "out_dim": 8})


def test_module_state_round_trips_through_load_from_checkpoint(tmp_path: Path):
    """Targets, queue and centre are registered state: a plain save/load keeps them exactly."""
    module = make_module(MoCoModule, projection=SMALL_PROJ, queue_size=8)
    module.ssl_step(images(2))  # the queue moves
    with torch.no_grad():
        for p in module.target.parameters():
            p.mul_(0.5)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    path = tmp_path / "moco.ckpt"
    trainer.save_checkpoint(path)
    loaded = MoCoModule.load_from_checkpoint(path, map_location="cpu")
    for key, tensor in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    assert loaded.queue.ptr.item() == 4
    copy.deepcopy(loaded)  # picklable/copyable (DDP spawn, EMA copies)
