"""A user's own config folder joins Hydra's search path: experiments (and group options)
outside the repo, found by name in both apps, checked like the packaged ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from ssl_mt.config import ConfigKeyError, check_group_keys, check_top_level_keys
from tests.helpers import compose_app


def user_folder(root: Path, experiment: str) -> Path:
    conf = root / "my_conf"
    (conf / "experiment").mkdir(parents=True)
    (conf / "experiment" / "mine.yaml").write_text(experiment)
    return conf


MINE = """# @package _global_
defaults:
  - quick
  - override /augment: my_augment

experiment_name: mine
seed: 11
"""


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    folder = user_folder(tmp_path, MINE)
    (folder / "augment").mkdir()
    # A user's augment preset: the packaged finetune one with other magnitudes.
    (folder / "augment" / "my_augment.yaml").write_text(
        "defaults:\n  - finetune\n  - _self_\nname: my_augment\nrotate_degrees: 3\n"
    )
    return folder


@pytest.mark.parametrize("app", ["finetune", "pretrain"])
def test_an_experiment_outside_the_repo_is_found_by_name(app, conf):
    cfg = compose_app(app, [f"hydra.searchpath=[file://{conf}]", "experiment=mine"])
    assert cfg.experiment_name == "mine" and cfg.seed == 11
    assert cfg.backbone.name == "test_efficientnet"  # from the packaged quick experiment
    assert cfg.augment.name == "my_augment" and cfg.augment.rotate_degrees == 3
    check_top_level_keys(cfg, app)
    check_group_keys(cfg)


def test_without_the_search_path_it_is_unknown(conf):
    with pytest.raises(Exception, match=r"experiment.*mine"):
        compose_app("finetune", ["experiment=mine"])


@pytest.mark.parametrize("app", ["finetune", "pretrain"])
def test_a_typo_in_a_user_experiment_is_named(app, tmp_path):
    folder = user_folder(
        tmp_path,
        MINE.replace("seed: 11", "seeed: 11").replace("  - override /augment: my_augment\n", ""),
    )
    cfg = compose_app(app, [f"hydra.searchpath=[file://{folder}]", "experiment=mine"])
    with pytest.raises(ConfigKeyError, match=r"unknown config key 'seeed'.*Did you mean seed"):
        check_top_level_keys(cfg, app)


def test_a_typo_in_a_user_settings_option_is_named(conf):
    (conf / "augment" / "my_augment.yaml").write_text(
        "defaults:\n  - finetune\n  - _self_\nname: my_augment\nrotate_degree: 3\n"
    )
    cfg = compose_app("finetune", [f"hydra.searchpath=[file://{conf}]", "experiment=mine"])
    with pytest.raises(ConfigKeyError, match=r"augment\.rotate_degree'.*augment\.rotate_degrees"):
        check_group_keys(cfg)
