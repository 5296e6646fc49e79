"""Config mistakes fail before any work, naming the key (or the group and option).

Each case checks that no checkpoint (and, where the error comes before the run directory,
no run directory) is created. One case goes through the real command line, run from an
empty working directory that must stay empty.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from hydra.errors import HydraException
from reliability_helpers import app_command, compose_app, run_app, subprocess_env, tiny_overrides

from ssl_mt.config import ConfigKeyError

APPS = ("finetune", "pretrain")


def _compose(app: str, run_dir: Path, *overrides: str):
    return compose_app(app, ["experiment=quick", f"run_dir={run_dir}", *overrides])


@pytest.mark.slow
def test_misspelt_override_on_the_command_line(tmp_path):
    run_dir = tmp_path / "run"
    done = subprocess.run(
        app_command("finetune", "experiment=quick", "data.bach_size=3", f"hydra.run.dir={run_dir}"),
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode != 0
    assert "bach_size" in done.stderr, done.stderr[-3000:]
    assert list(tmp_path.iterdir()) == [], "a run directory or an outputs/ folder was created"


@pytest.mark.parametrize("app", APPS)
def test_unknown_top_level_key_is_named_with_a_suggestion(app, tmp_path):
    run_dir = tmp_path / "run"
    cfg = _compose(app, run_dir, "+seeed=1")
    with pytest.raises(ConfigKeyError, match=r"unknown config key 'seeed'.*Did you mean seed\?"):
        run_app(app, cfg)
    assert not run_dir.exists()


def _experiment_dir(tmp_path: Path, body: str) -> Path:
    folder = tmp_path / "conf"
    (folder / "experiment").mkdir(parents=True)
    (folder / "experiment" / "typo.yaml").write_text(
        "# @package _global_\ndefaults:\n  - quick\n" + body
    )
    return folder


@pytest.mark.parametrize("app", APPS)
def test_misspelt_key_in_an_experiment_file(app, tmp_path):
    conf = _experiment_dir(tmp_path, "seeed: 1\n")
    run_dir = tmp_path / "run"
    cfg = compose_app(
        app, [f"hydra.searchpath=[file://{conf}]", "experiment=typo", f"run_dir={run_dir}"]
    )
    assert cfg.seeed == 1  # Hydra merges it without complaint: the app must refuse it
    with pytest.raises(ConfigKeyError, match=r"'seeed'.*Did you mean seed\?"):
        run_app(app, cfg)
    assert not run_dir.exists()


@pytest.mark.parametrize("app", APPS)
def test_misspelt_nested_key_in_an_experiment_file_fails_before_training(app, tmp_path):
    """``data`` is built from its config by keyword: the unknown argument is named."""
    conf = _experiment_dir(tmp_path, "data:\n  bach_size: 3\n")
    run_dir = tmp_path / "run"
    cfg = compose_app(
        app, [f"hydra.searchpath=[file://{conf}]", "experiment=typo", f"run_dir={run_dir}"]
    )
    with pytest.raises(Exception, match="bach_size"):
        run_app(app, cfg)
    assert not (run_dir / "checkpoints").exists()
    assert not (run_dir / "metrics.csv").exists()


@pytest.mark.parametrize("app", APPS)
@pytest.mark.parametrize(("override", "key"), [("seed=abc", "seed"), ("compile=maybe", "compile")])
def test_wrong_type_names_the_key(app, tmp_path, override, key):
    run_dir = tmp_path / "run"
    cfg = _compose(app, run_dir, override)
    with pytest.raises(TypeError, match=rf"config key '{key}' must be"):
        run_app(app, cfg)
    assert not run_dir.exists()


@pytest.mark.parametrize(
    ("app", "group", "option"),
    [
        ("finetune", "trainer", "gpux"),
        ("finetune", "weighting", "foo"),
        ("pretrain", "trainer", "gpux"),
        ("pretrain", "method", "foo"),
    ],
)
def test_unknown_option_names_the_group_and_lists_the_options(app, group, option):
    with pytest.raises(HydraException) as info:
        compose_app(app, ["experiment=quick", f"{group}={option}"])
    message = str(info.value)
    assert f"Could not find '{group}/{option}'" in message
    assert f"Available options in '{group}'" in message


def test_misspelt_key_inside_the_optim_group_of_an_experiment_file(synthetic_root, tmp_path):
    conf = _experiment_dir(tmp_path, "optim:\n  base_lrr: 0.5\n")
    cfg = compose_app(
        "finetune",
        [
            f"hydra.searchpath=[file://{conf}]",
            *(  # the typo experiment, which includes quick, in place of quick
                "experiment=typo" if o == "experiment=quick" else o
                for o in tiny_overrides("finetune", synthetic_root, f"run_dir={tmp_path / 'run'}")
            ),
            "schedule.stages=[{size:32,epochs:1,batch_size:8}]",
            "++trainer.limit_train_batches=1",
            "++trainer.limit_val_batches=1",
        ],
    )
    assert cfg.optim.base_lrr == 0.5 and cfg.experiment_name == "quick"
    with pytest.raises(Exception, match=r"optim\.base_lrr.*Did you mean optim\.base_lr"):
        run_app("finetune", cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_misspelt_timm_argument_in_the_backbone_group_is_named(synthetic_root, tmp_path):
    cfg = compose_app(
        "finetune",
        [
            *tiny_overrides("finetune", synthetic_root, f"run_dir={tmp_path / 'run'}"),
            "+backbone.drop_ratee=0.1",
        ],
    )
    with pytest.raises(Exception, match="drop_ratee"):
        run_app("finetune", cfg)
