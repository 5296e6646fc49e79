"""Every option of every config group composes, in both apps, and builds what it names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from ssl_mt.config import CONF_DIR, app_groups
from ssl_mt.runner import build_trainer
from tests.helpers import available_trackers, compose_app

APPS = ("pretrain", "finetune")
GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_every_group_is_used_by_an_app():
    assert set(GROUPS) <= app_groups("pretrain") | app_groups("finetune")


def test_groups_of_the_design_exist():
    for group in (
        "data",
        "backbone",
        "augment",
        "tasks",
        "schedule",
        "trainer",
        "logger",
        "experiment",
    ):
        assert options(group), f"conf/{group} has no options"


# Groups with no ``_target_`` of their own, and what builds from them.
MODULE_GROUPS = {"method", "model", "backbone", "optim", "weighting"}
DATA_GROUPS = {"data", "augment", "schedule", "tasks"}


def target_nodes(node: Any, path: str = "") -> list[tuple[str, DictConfig]]:
    """Every node with a ``_target_`` inside ``node`` (itself included), outermost first."""
    found: list[tuple[str, DictConfig]] = []
    if isinstance(node, DictConfig):
        if "_target_" in node:
            found.append((path, node))
        for key in node:
            found += target_nodes(node[key], f"{path}.{key}" if path else str(key))
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node):
            found += target_nodes(item, f"{path}[{i}]")
    return found


def build_app_module(app: str, cfg: DictConfig) -> Any:
    from ssl_mt.finetune import build_module as finetune_module
    from ssl_mt.pretrain import build_module as pretrain_module

    return (pretrain_module if app == "pretrain" else finetune_module)(cfg)


def build_datamodule(cfg: DictConfig) -> Any:
    datamodule = instantiate(cfg.data, _recursive_=False, _convert_="all")
    datamodule.setup("fit")  # reads the manifest and builds the transforms
    return datamodule


def instantiate_group(app: str, group: str, cfg: DictConfig) -> list[str]:
    """Builds what the option feeds, as the app does; returns the paths built."""
    built = []
    if group in MODULE_GROUPS:
        build_app_module(app, cfg)
        built.append("module")
    if group in DATA_GROUPS:
        build_datamodule(cfg)
        built.append("datamodule")
    # The entries below the group's root (callbacks, loggers, the strategy) build their
    # own nested nodes (the strategy's timeout).
    entries = [(p, n) for p, n in target_nodes(cfg[group]) if p and "." not in p]
    if group == "trainer" and cfg.trainer.accelerator != "gpu":
        build_trainer(cfg)
        built.append("trainer")
    elif group not in MODULE_GROUPS | DATA_GROUPS:
        for path, node in entries:
            instantiate(node)
            built.append(path)
    return built


@pytest.mark.parametrize(
    ("app", "group", "option"),
    [
        (app, g, o)
        for app in APPS
        for g in sorted(app_groups(app) - {"experiment"})
        for o in options(g)
    ],
)
def test_every_option_composes_and_instantiates(
    app: str, group: str, option: str, synthetic_root: Path, tmp_path: Path
):
    """Each option builds what it configures, as the app would (the quick profile's tiny
    backbone unless the option is a backbone). Catches a ``_target_`` or argument that no
    longer exists, which composing alone cannot; ``trainer=ddp`` builds its strategy but
    not its Trainer, which needs a GPU."""
    if group == "logger" and option in ("mlflow", "wandb") and option not in available_trackers():
        pytest.skip(f"the {option} extra is not installed")
    if group == "callbacks" and option != app:
        pytest.skip(f"callbacks={option} is the {option} app's (it reads that app's keys)")
    if group == "trainer" and option == "gpu":
        pytest.skip("trainer=gpu: its only _target_ is the Trainer, which needs a GPU")
    overrides = [f"{group}={option}", f"data.root={synthetic_root}", f"run_dir={tmp_path}"]
    if group != "backbone":
        overrides.append("backbone=test_efficientnet")
    cfg = compose_app(app, overrides)
    # Resolving catches broken interpolations (e.g. a key another group no longer has).
    OmegaConf.to_container(cfg, resolve=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            patch.setenv(name, str(tmp_path / name.lower()))
        built = instantiate_group(app, group, cfg)
    assert built, f"nothing built for {group}={option}"
    if group == "trainer" and option == "ddp":  # the Trainer needs a GPU: its strategy only
        assert built == ["strategy"]


@pytest.mark.parametrize(
    ("app", "experiment"),
    [("pretrain", "quick"), ("pretrain", "seed_b4"), ("finetune", "quick"), ("finetune", "mt")],
)
def test_experiments_compose(app: str, experiment: str):
    cfg = compose_app(app, [f"experiment={experiment}"])
    OmegaConf.to_container(cfg, resolve=True)
    assert cfg.experiment_name == experiment


def test_mt_ssl_requires_weights_and_differs_from_mt_only_there():
    mt = compose_app("finetune", ["experiment=mt"])
    ssl = compose_app("finetune", ["experiment=mt_ssl", "backbone.weights=/x/backbone.safetensors"])
    a = OmegaConf.to_container(mt, resolve=True)
    b = OmegaConf.to_container(ssl, resolve=True)
    assert a["backbone"]["weights"] is None
    assert b["backbone"]["weights"] == "/x/backbone.safetensors"
    a["backbone"].pop("weights"), b["backbone"].pop("weights")
    a.pop("experiment_name"), b.pop("experiment_name")
    a.pop("require_backbone_weights"), b.pop("require_backbone_weights")
    assert a == b
    from ssl_mt.finetune import build_module

    with pytest.raises(ValueError, match=r"backbone\.weights"):
        build_module(compose_app("finetune", ["experiment=mt_ssl"]))


@pytest.mark.parametrize("app", APPS)
@pytest.mark.parametrize("logger", ["csv", "tensorboard"])
def test_loggers_instantiate(app: str, logger: str, tmp_path):
    cfg = compose_app(app, [f"logger=[{logger}]", f"run_dir={tmp_path}"])
    built = [instantiate(node) for node in cfg.logger.values()]
    assert len(built) == 1


@pytest.mark.parametrize("trainer", ["cpu", "default"])
def test_trainers_instantiate(trainer: str, tmp_path):
    cfg = compose_app("finetune", [f"trainer={trainer}", "experiment=quick", f"run_dir={tmp_path}"])
    built = instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
    assert built.max_epochs == sum(s.epochs for s in cfg.schedule.stages)


def test_callbacks_instantiate(tmp_path):
    for app in APPS:
        cfg = compose_app(app, ["experiment=quick", f"run_dir={tmp_path}"])
        assert [instantiate(node) for node in cfg.callbacks.values()]


def test_misspelt_override_names_the_key():
    with pytest.raises(Exception, match="bach_size"):
        compose_app("finetune", ["data.bach_size=3"])
