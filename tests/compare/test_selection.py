"""Which records are compared: a best checkpoint is never judged on the split that chose it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from ssl_mt.compare.report import load_choice
from ssl_mt.compare.run import CompareError
from ssl_mt.compare.selection import resolve_choice, selection_split
from ssl_mt.evaluation.records import records_path

MONITOR = {"callbacks": {"checkpoint": {"monitor": "val/96/global/loss"}}}


def _run(root: Path, name: str, splits=("val", "test")) -> tuple[Path, dict]:
    run_dir = root / name
    for checkpoint in ("best", "last"):
        for split in splits:
            path = records_path(run_dir, checkpoint, split, 96)
            path.parent.mkdir(parents=True, exist_ok=True)
            pd.DataFrame({"image": [], "task": [], "loss": []}).to_csv(path, index=False)
    return run_dir, MONITOR


def test_the_default_is_auto_and_never_best_on_the_split_that_chose_it(tmp_path: Path):
    choice = load_choice()
    assert (choice.checkpoint, choice.split) == ("auto", "auto")
    with_test = [_run(tmp_path, "a"), _run(tmp_path, "b")]
    resolved = resolve_choice(choice, with_test)
    assert (resolved.checkpoint, resolved.split) == ("best", "test")
    assert "chosen on val" in resolved.label and "judged on test" in resolved.label
    without = [_run(tmp_path, "c", ("val",)), _run(tmp_path, "d", ("val",))]
    resolved = resolve_choice(choice, without)
    assert (resolved.checkpoint, resolved.split) == ("last", "val")
    assert "no test split" in resolved.note
    # one run without test records is enough to fall back
    assert resolve_choice(choice, [with_test[0], without[0]]).checkpoint == "last"


def test_every_resolution_avoids_the_selection_split(tmp_path: Path):
    runs = [_run(tmp_path, "a"), _run(tmp_path, "b")]
    for checkpoint in ("auto", "best", "last"):
        for split in ("auto", "val", "test"):
            choice = load_choice({"checkpoint": checkpoint, "split": split})
            try:
                resolved = resolve_choice(choice, runs)
            except CompareError as error:
                assert checkpoint == "best" and split == "val", error
                assert "--split test" in str(error) and "--checkpoint last" in str(error)
                continue
            assert not (resolved.checkpoint == "best" and resolved.split == "val")


def test_best_without_a_test_split_is_refused_with_the_way_out(tmp_path: Path):
    runs = [_run(tmp_path, "a", ("val",))]
    with pytest.raises(CompareError, match="--checkpoint last"):
        resolve_choice(load_choice({"checkpoint": "best"}), runs)


def test_the_selection_split_comes_from_the_monitor():
    assert selection_split(MONITOR) == "val"
    assert selection_split({"callbacks": {"checkpoint": {"monitor": "test/96/skin/iou"}}}) == "test"
    assert selection_split({}) == "val"
