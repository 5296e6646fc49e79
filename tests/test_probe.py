"""Frozen-backbone probe: every backbone on the same split, and scores that mean something."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm

from ssl_mt.models.backbone import export_backbone
from ssl_mt.probe import main, parse_backbone, score_task
from ssl_mt.tasks import TaskSpec

TASK = TaskSpec(name="t", kind="classification", column="t", classes=("a", "b", "c"))


def test_separable_features_are_scored_perfectly_and_noise_near_majority() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], [60, 20, 20])
    centres = rng.normal(0, 5, (3, 16))
    x = centres[y] + rng.normal(0, 0.5, (100, 16))
    rows = {r["method"]: r for r in score_task(x, y, x[::2], y[::2], TASK, k=5, c=1.0)}
    assert rows["linear"]["top1"] == 1.0 and rows["knn"]["top1"] == 1.0
    assert rows["majority"]["top1"] == pytest.approx(np.mean(y[::2] == 0))
    noise = rng.normal(size=(100, 16))
    rows = {r["method"]: r for r in score_task(noise, y, noise[::2] + 3, y[::2], TASK, 5, 1.0)}
    assert rows["linear"]["top1"] < 0.8  # nothing to learn: no better than chance-ish


def test_unlabeled_entries_are_ignored() -> None:
    y = np.array([0, 1, -1, 0, 1, -1] * 5)
    x = np.eye(2)[np.clip(y, 0, 1)] + (y[:, None] < 0) * 100.0
    rows = score_task(x, y, x, y, TASK, k=3, c=1.0)
    assert all(r["n_train"] == 20 and r["n_val"] == 20 for r in rows)


def test_backbone_arguments_parse_or_name_the_problem(tmp_path: Path) -> None:
    assert parse_backbone("random:test_efficientnet").pretrained is False
    spec = parse_backbone("imagenet:efficientnet_b4")
    assert spec.pretrained and spec.overlay_file is None
    with pytest.raises(ValueError, match="does not exist"):
        parse_backbone(f"imagenet:efficientnet_b4={tmp_path / 'missing.safetensors'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not an export folder"):
        parse_backbone(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="expected"):
        parse_backbone("resnet50")


@pytest.mark.slow
def test_cli_probes_an_export_and_a_random_backbone_on_the_same_split(
    synthetic_root: Path, tmp_path: Path
) -> None:
    export = export_backbone(
        timm.create_model("test_efficientnet", num_classes=0),
        "test_efficientnet",
        tmp_path / "run" / "backbone",
    )
    out = tmp_path / "probe"
    args = [str(export), "random:test_efficientnet", "--data", str(synthetic_root)]
    assert main([*args, "--out", str(out), "--size", "32", "--k", "5"]) == 0
    table = pd.read_csv(out / "probe.csv")
    assert set(table["backbone"]) == {str(export), "random:test_efficientnet"}
    assert set(table["task"]) == {"blur", "tone", "relevance"}
    assert set(table["method"]) >= {"knn", "majority"}
    # The same split for both: identical counts and identical majority rows.
    majority = table[table["method"] == "majority"].set_index(["backbone", "task"])["top1"]
    assert majority[str(export)].equals(majority["random:test_efficientnet"])
    assert table.groupby("task")["n_val"].nunique().max() == 1
    assert "| random:test_efficientnet | knn |" in (out / "probe.md").read_text()
