"""What is timed, built as the apps build it: their composed config, ``build_module`` and
datamodule, driven without a Trainer.

Every workload starts from :func:`ssl_mt.config.compose` of the ``pretrain`` or ``finetune``
app with the bench's choices as Hydra overrides (backbone, optimiser, tasks, one schedule
stage at the measured size), so a row measures the model, optimiser and loader a run gets.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from ssl_mt import finetune, pretrain
from ssl_mt.bench.instruments import PeakMemory, Precision
from ssl_mt.bench.settings import BenchSettings
from ssl_mt.config import CONF_DIR, compose, group_options
from ssl_mt.data.manifest import MANIFEST_NAME
from ssl_mt.models.backbone import create_backbone
from ssl_mt.optim import build_optimizer, decay_groups
from ssl_mt.runner import backbone_kwargs, plain
from ssl_mt.tasks import TaskSpec, parse_tasks

CEILING_CLASSES = 1000


# ---------------------------------------------------------------------------------------------
# Config: the apps' own, composed with the bench's overrides
# ---------------------------------------------------------------------------------------------
def _option(group: str, name_or_path: str) -> tuple[str, list[Path]]:
    """``group=name`` and the config folder a YAML path brings onto Hydra's search path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"no {group} config file {path}")
        return f"{group}={path.stem}", [path.parent.parent]
    return f"{group}={name_or_path}", []


def _backbone_overrides(name: str) -> list[str]:
    """The ``conf/backbone`` entry of a timm model (drop path, decoder widths), offline; a
    model without an entry gets plain defaults (no drop path, smp's decoder widths)."""
    for option in group_options("backbone"):
        if OmegaConf.load(CONF_DIR / "backbone" / f"{option}.yaml").get("name") == name:
            return [f"backbone={option}"]
    return [
        "backbone=test_efficientnet",
        f"backbone.name={name}",
        "backbone.drop_path_rate=0.0",
        "backbone.grad_checkpointing=false",
        "backbone.decoder_channels=null",
    ]


@functools.lru_cache(maxsize=8)
def _composed(app: str, overrides: tuple[str, ...], config_dirs: tuple[Path, ...]) -> DictConfig:
    return compose(app, list(overrides), config_dirs)


def app_config(
    app: str, s: BenchSettings, size: int, batch: int, data: Mapping[str, Any] | None = None
) -> DictConfig:
    """The ``app`` config with the bench's choices, one schedule stage at ``size``, and the
    ``data`` keys set (``{"data.num_workers": 2}``; Hydra's struct mode refuses unknown ones).

    Composed once per app and choices (Hydra takes a second per compose); every caller gets
    its own copy.
    """
    tasks, config_dirs = _option("tasks", s.tasks)
    overrides = [
        *_backbone_overrides(s.backbone),
        f"optim={s.optim}",
        tasks,
        f"seed={s.seed}",
        f"channels_last={str(bool(s.channels_last)).lower()}",
        f"compile={str(bool(s.compile)).lower()}",
    ]
    if app == "pretrain":
        overrides += ["method=simclr", f"augment={s.ssl_augment}", "data.knn_tasks=[]"]
    else:
        overrides += ["model=unet", f"weighting={s.weighting}"]
    cfg = copy.deepcopy(_composed(app, tuple(overrides), tuple(config_dirs)))
    stage = {"size": size, "epochs": 1, "batch_size": batch}
    values = {"schedule.stages": [stage], "schedule.eval_sizes": [size], **(data or {})}
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def tasks_of(s: BenchSettings) -> tuple[dict[str, Any], list[TaskSpec]]:
    """The task config (plain) and its parsed tasks, as fine-tuning composes them."""
    cfg = plain(app_config("finetune", s, 64, 2).tasks)
    return cfg, parse_tasks(cfg)


# ---------------------------------------------------------------------------------------------
# Models and steps
# ---------------------------------------------------------------------------------------------
@dataclass
class Workbench:
    """A model, its optimiser and its step function; shared by a device row and its e2e row."""

    kind: str
    module: nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[Any], None]
    host_baseline: int | None


def _optimizer(module: nn.Module, optim_cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    groups = decay_groups(module, float(optim_cfg.get("weight_decay", 0.0)), tag="all")
    return build_optimizer(groups, optim_cfg, float(optim_cfg["base_lr"]))


def build_ceiling(
    s: BenchSettings, device: torch.device, memory: PeakMemory, size: int, batch: int
) -> Workbench:
    """The bare backbone + a linear layer; cross-entropy on random labels."""
    cfg = app_config("pretrain", s, size, batch)
    baseline = memory.host_baseline()
    backbone = create_backbone(**backbone_kwargs(cfg.backbone))
    model = nn.ModuleDict(
        {"backbone": backbone, "head": nn.Linear(backbone.num_features, CEILING_CLASSES)}
    ).to(device)
    model.train()
    if s.channels_last:
        model.to(memory_format=torch.channels_last)
    if s.compile:
        backbone.compile(dynamic=False)
    optimizer = _optimizer(model, plain(cfg.optim))
    precision = Precision(s.precision, device)

    def step(batch: tuple[Tensor, Tensor]) -> None:
        images, labels = batch
        with precision.autocast():
            logits = model["head"](model["backbone"](images))
            loss = F.cross_entropy(logits.float(), labels)
        precision.backward_step(loss, optimizer)

    return Workbench("ceiling", model, optimizer, step, baseline)


def build_simclr(
    s: BenchSettings, device: torch.device, memory: PeakMemory, size: int, batch: int
) -> Workbench:
    """The pretraining app's module (``method=simclr``); step = ``ssl_step``."""
    cfg = app_config("pretrain", s, size, batch)
    baseline = memory.host_baseline()
    module = pretrain.build_module(cfg).to(device)
    module.configure_model()  # channels_last + backbone.compile(dynamic=False), as in fit
    module.train()
    optimizer = _optimizer(module, plain(cfg.optim))
    precision = Precision(s.precision, device)

    def step(views: Sequence[Tensor]) -> None:
        with precision.autocast():
            loss, _, _ = module.ssl_step(views)
        precision.backward_step(loss, optimizer)

    return Workbench("simclr", module, optimizer, step, baseline)


def build_multitask(
    s: BenchSettings, device: torch.device, memory: PeakMemory, size: int, batch: int
) -> Workbench:
    """The fine-tuning app's module; the training step's forward, masked task losses and
    weighting, without logging."""
    cfg = app_config("finetune", s, size, batch)
    baseline = memory.host_baseline()
    module = finetune.build_module(cfg).to(device)
    module.configure_model()  # channels_last + net.compile(dynamic=False), as in fit
    module.train()
    optimizer = _optimizer(module, plain(cfg.optim))
    precision = Precision(s.precision, device)

    def step(batch: Mapping[str, Any]) -> None:
        with precision.autocast():
            outputs = module(batch["image"])
            losses = module.task_losses(outputs, batch)
            present = {name: flags.any() for name, flags in batch["present"].items()}
            total, _ = module.weighting(losses, present)
        precision.backward_step(total, optimizer)

    return Workbench("mt", module, optimizer, step, baseline)


def build_unet(
    s: BenchSettings, device: torch.device, memory: PeakMemory, size: int, batch: int
) -> Workbench:
    """The multi-task step's honest ceiling: a plain smp U-Net with the same encoder, decoder
    widths and segmentation outputs, a BCE loss, the same optimiser (no heads, no masking)."""
    cfg = app_config("finetune", s, size, batch)
    tasks = parse_tasks(plain(cfg.tasks))
    backbone = plain(cfg.backbone)
    kwargs: dict[str, Any] = {}
    if cfg.model.get("decoder_channels") is not None:
        kwargs["decoder_channels"] = list(cfg.model.decoder_channels)
    if backbone.get("drop_path_rate"):
        kwargs["drop_path_rate"] = backbone["drop_path_rate"]
    baseline = memory.host_baseline()
    net = smp.Unet(
        f"tu-{backbone['name']}",
        encoder_weights=None,
        classes=max(1, sum(t.is_segmentation for t in tasks)),
        **kwargs,
    ).to(device)
    net.train()
    if s.channels_last:
        net.to(memory_format=torch.channels_last)
    if s.compile:
        net.compile(dynamic=False)
    optimizer = _optimizer(net, plain(cfg.optim))
    precision = Precision(s.precision, device)

    def step(batch: tuple[Tensor, Tensor]) -> None:
        images, masks = batch
        with precision.autocast():
            logits = net(images)
            loss = F.binary_cross_entropy_with_logits(logits.float(), masks)
        precision.backward_step(loss, optimizer)

    return Workbench("unet", net, optimizer, step, baseline)


def random_mt_batch(
    tasks: Sequence[TaskSpec], batch: int, size: int, device: torch.device
) -> dict[str, Any]:
    """A multi-task batch on the device: images, masks, labels, ~80% presence per task."""
    image = torch.randn(batch, 3, size, size, device=device)
    target: dict[str, Tensor] = {}
    present: dict[str, Tensor] = {}
    for task in tasks:
        flags = torch.rand(batch, device=device) < 0.8
        present[task.name] = flags
        if task.is_segmentation:
            target[task.name] = (torch.rand(batch, 1, size, size, device=device) < 0.3).float()
        else:
            labels = torch.randint(task.num_classes, (batch,), device=device)
            target[task.name] = torch.where(flags, labels, torch.full_like(labels, -1))
    return {"image": image, "target": target, "present": present}


# ---------------------------------------------------------------------------------------------
# Loaders: the apps' datamodules
# ---------------------------------------------------------------------------------------------
def _data_overrides(root: Path, workers: int, pin: bool, decoding: str) -> dict[str, Any]:
    return {
        "data.root": str(root),
        "data.num_workers": workers,
        "data.pin_memory": pin,
        "data.persistent_workers": True,
        "data.reduced_decoding": decoding == "reduced",
    }


def train_images(s: BenchSettings, root: Path) -> list[Path]:
    """The SSL datamodule's training images (what ``data_ssl`` decodes), in its order."""
    size = s.sizes[0]
    cfg = app_config("pretrain", s, size, s.batch_sizes[0], _data_overrides(root, 0, False, "full"))
    datamodule = instantiate(cfg.data, _recursive_=False, _convert_="all")
    datamodule.setup("fit")
    return [Path(p) for p in datamodule.images]


def train_loader(
    app: str,
    s: BenchSettings,
    root: Path,
    size: int,
    batch: int,
    workers: int,
    pin: bool,
    decoding: str,
):
    """The training loader of the ``app``'s datamodule for one stage at ``size``."""
    if app == "finetune" and not (root / MANIFEST_NAME).is_file():
        raise ValueError(
            f"{root}: the multi-task rows need a labelled dataset ({MANIFEST_NAME}); "
            "drop --data to use a synthetic one, or pick rows with --only"
        )
    data = _data_overrides(root, workers, pin, decoding)
    if app == "finetune":
        data["data.eval_batch_size"] = batch
    cfg = app_config(app, s, size, batch, data)
    datamodule = instantiate(cfg.data, _recursive_=False, _convert_="all")
    datamodule.setup("fit")
    return datamodule.train_dataloader()
