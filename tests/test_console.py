"""What a user reads on the console: one summary block at the start, no third-party tips
or known deprecation warnings, and one line naming a bad file instead of a traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from tests.helpers import run_quick_app

pytestmark = pytest.mark.slow

# Printed by the installed libraries in every run before they were silenced.
KNOWN_NOISE = (
    "💡 Tip",  # Lightning's litlogger / litmodels promotions
    "litlogger",
    "litmodels",
    "LeafSpec",  # torch's FutureWarning raised through Lightning's _pytree
    "'pin_memory' argument is set as true but no accelerator",
    "anonymous setting has no effect",  # wandb, on Lightning's anonymous=None
    "Creating initial MLflow database tables",
    "not found. Creating it",  # Lightning's MLFlowLogger on a new experiment
    "Traceback",
)


def _assert_clean(output: str) -> None:
    found = [noise for noise in KNOWN_NOISE if noise in output]
    assert not found, f"{found} in:\n{output[-4000:]}"


def test_finetune_console_has_the_summary_and_no_noise(quick_finetune_run, synthetic_root) -> None:
    run_dir, output = quick_finetune_run
    _assert_clean(output)
    assert output.count("run summary") == 1
    block = output[output.index("run summary") :]
    assert f"run directory  {run_dir}" in block
    assert "devices        cpu × 1 device(s) × 1 node(s) = 1 process(es), precision 32" in block
    assert "global batch   8 = 8 per device × 1 × 1 accumulated (32 px, epoch 0)" in block
    assert "lr (peak)      AdamW: backbone 0.003, head 0.003" in block
    assert f"data           {synthetic_root}: images and labeled samples per split" in block
    # Images per split, and labeled samples per task and split, as labels.csv has them.
    rows = {line.split()[0]: line.split() for line in block.splitlines() if line.startswith("  ")}
    table = pd.read_csv(synthetic_root / "labels.csv", dtype=str, keep_default_na=False)
    train = table["split"] == "train"
    assert rows["samples"][1:3] == [str(train.sum()), str((table["split"] == "val").sum())]
    for task, column in (("skin", "skin_mask"), ("tone", "tone")):
        assert rows[task][2] == str((train & (table[column] != "")).sum())


def test_pretrain_on_a_folder_with_macos_companions(synthetic_root: Path, tmp_path: Path) -> None:
    # An image folder as copied from a Mac: every photo has a `._` companion.
    folder = tmp_path / "photos"
    folder.mkdir()
    for image in sorted((synthetic_root / "images").glob("*.jpg"))[:16]:
        shutil.copy(image, folder / image.name)
        (folder / f"._{image.name}").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X" * 4)
    run_dir = tmp_path / "run"
    result = run_quick_app(
        "pretrain",
        [
            f"data.root={folder}",
            "data.source=folder",
            f"hydra.run.dir={run_dir}",
            "schedule.stages=[{size:32,epochs:1,batch_size:8}]",
            "schedule.eval_sizes=[32]",
            "method.projection.hidden_dim=64",
            "logger=[csv]",
        ],
        tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    _assert_clean(output)
    assert "skipped 16 hidden file(s)" in output
    block = output[output.index("run summary") :]
    assert f"{folder}: 16 training images (folder)" in block
    assert (run_dir / "backbone" / "model.safetensors").is_file()


def test_a_bad_file_stops_the_run_with_one_line(synthetic_root: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    table = pd.read_csv(data / "labels.csv", dtype=str, keep_default_na=False)
    i = int(np.flatnonzero(table["split"] == "train")[0])
    bad = data / table.at[i, "image"]
    bad.write_bytes(b"\x00garbage, not a JPEG\xff" * 40)
    assert cv2.imread(str(bad)) is None
    result = run_quick_app(
        "finetune",
        [
            f"data.root={data}",
            f"hydra.run.dir={tmp_path / 'run'}",
            "schedule.stages=[{size:32,epochs:1,batch_size:8}]",
            "schedule.eval_sizes=[32]",
            "data.num_workers=2",  # the error comes from a DataLoader worker
            "logger=[csv]",
        ],
        tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-4000:]
    assert "Traceback" not in output and "DataLoader worker" not in output
    last = result.stdout.strip().splitlines()[-1]  # stderr holds only Python's warnings
    assert "bad sample: corrupt or unreadable image" in last
    assert f"{bad} (labels.csv row {i + 2})" in last
