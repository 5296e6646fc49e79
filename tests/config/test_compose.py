"""Every option of every config group composes, in both apps, and builds what it names."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ssl_mt.config import CONF_DIR, app_groups
from tests.helpers import compose_app

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


@pytest.mark.parametrize(
    ("app", "group", "option"),
    [
        (app, g, o)
        for app in APPS
        for g in sorted(app_groups(app) - {"experiment", "logger"})
        for o in options(g)
    ],
)
def test_every_option_composes(app: str, group: str, option: str):
    cfg = compose_app(app, [f"{group}={option}"])
    # Resolving catches broken interpolations (e.g. a key another group no longer has).
    container = OmegaConf.to_container(cfg, resolve=True)
    assert container[group] is not None


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
