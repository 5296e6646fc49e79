"""The study driver: run folders in the layout compare reads, arms that differ only in init."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ssl_mt.study import fraction_dir, main, plan
from tests.helpers import compose_app


def test_fraction_folders_have_three_digit_percents() -> None:
    assert [fraction_dir(f) for f in (0.05, 0.25, 1.0)] == ["frac005", "frac025", "frac100"]
    for bad in (0.0, 1.5, 0.125):
        with pytest.raises(ValueError, match="label fraction"):
            fraction_dir(bad)


def test_plan_covers_every_arm_fraction_and_seed(tmp_path: Path) -> None:
    weights = tmp_path / "backbone"
    weights.mkdir()
    runs = plan(
        tmp_path / "study",
        ["mt", "mt_ssl"],
        [1.0, 0.05],
        [0, 1],
        weights,
        None,
        ["experiment=quick"],
    )
    folders = [run_dir.relative_to(tmp_path / "study").as_posix() for run_dir, _ in runs]
    assert len(folders) == len(set(folders)) == 2 * 2 * 2
    assert folders[0] == "mt/frac005/seed0"  # smallest fraction first
    assert "mt_ssl/frac100/seed1" in folders
    for run_dir, overrides in runs:
        assert f"hydra.run.dir={run_dir}" in overrides
        assert overrides[0] == "experiment=quick"


def composed(overrides: list[str]) -> dict:
    kept = [o for o in overrides if not o.startswith("hydra.")]
    return OmegaConf.to_container(compose_app("finetune", kept), resolve=True)


def test_arms_at_one_fraction_and_seed_differ_only_in_the_backbone_init(tmp_path: Path) -> None:
    weights = tmp_path / "backbone"
    weights.mkdir()
    runs = plan(
        tmp_path, ["mt", "mt_ssl", "mt_imagenet"], [0.25], [2], weights, None, ["experiment=quick"]
    )
    configs = [composed(overrides) for _, overrides in runs]
    for cfg in configs:
        assert cfg["data"]["label_fraction"] == 0.25
        assert cfg["seed"] == 2
        assert cfg["data"]["label_seed"] == 0  # the labels do not follow the run seed
    mt, ssl, imagenet = configs
    assert ssl["backbone"]["weights"] == str(weights) and ssl["require_backbone_weights"]
    assert imagenet["backbone"]["pretrained"] is True
    for cfg in configs:
        for key in ("experiment_name", "require_backbone_weights"):
            cfg.pop(key)
        cfg["backbone"].pop("weights"), cfg["backbone"].pop("pretrained")
    assert mt == ssl == imagenet


def test_ssl_arm_without_weights_is_refused_before_any_run(tmp_path: Path, capsys) -> None:
    assert main(["--out", str(tmp_path), "--arms", "mt_ssl", "--", "experiment=quick"]) == 2
    assert "--weights" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
