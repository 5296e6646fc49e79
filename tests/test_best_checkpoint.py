"""``RUN/checkpoints/best.ckpt``: the stable name of a fine-tuning run's best checkpoint,
which is written as ``best_epoch{NNN}.ckpt`` (predict and export resolve it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssl_mt.checkpointing import resolve_best


def run_with(tmp_path: Path, *names: str, recorded: str | None = None) -> Path:
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    for name in names:
        (folder / name).write_bytes(b"")
    if recorded is not None:
        info = tmp_path / "run" / "eval" / "best" / "checkpoint.json"
        info.parent.mkdir(parents=True)
        # recorded with the path of the run as it was then (the folder may have moved since)
        info.write_text(json.dumps({"checkpoint": f"/elsewhere/checkpoints/{recorded}"}))
    return folder


def test_best_is_the_checkpoint_the_run_recorded(tmp_path: Path):
    """Catches taking the newest or first best_epoch file instead of the recorded one."""
    folder = run_with(
        tmp_path, "best_epoch003.ckpt", "best_epoch007.ckpt", recorded="best_epoch003.ckpt"
    )
    assert resolve_best(folder / "best.ckpt") == folder / "best_epoch003.ckpt"


def test_best_without_a_record_is_the_only_best_epoch_file(tmp_path: Path):
    folder = run_with(tmp_path, "best_epoch005.ckpt", "last.ckpt", recorded="best_epoch002.ckpt")
    assert resolve_best(folder / "best.ckpt") == folder / "best_epoch005.ckpt"


def test_an_existing_path_or_another_name_is_kept(tmp_path: Path):
    folder = run_with(tmp_path, "best.ckpt", "best_epoch001.ckpt")
    assert resolve_best(folder / "best.ckpt") == folder / "best.ckpt"
    assert resolve_best(folder / "missing.ckpt") == folder / "missing.ckpt"


@pytest.mark.parametrize("names", [("last.ckpt",), ("best_epoch001.ckpt", "best_epoch002.ckpt")])
def test_no_or_several_best_checkpoints_are_named(tmp_path: Path, names):
    folder = run_with(tmp_path, *names)
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found: .*best\.ckpt") as err:
        resolve_best(folder / "best.ckpt")
    assert str(folder) in str(err.value)
