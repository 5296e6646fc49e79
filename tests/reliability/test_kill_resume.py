"""SIGKILL a real training process mid-epoch, re-run the same command: nothing lost or repeated.

The runs are the apps' own command lines (``python -m ssl_mt.finetune ...``) with a
:class:`reliability_probes.StepBeacon` added through the config: it parks the process at a
chosen batch (once), so the kill lands exactly there, mid-epoch, after an end-of-epoch
checkpoint. Re-running the same command (``ckpt_path=auto``) must resume from
``RUN/checkpoints/last.ckpt`` and end with one log row per epoch, the progressive stage of
every epoch as scheduled, and a final checkpoint that loads with ``weights_only=True``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from reliability_helpers import (
    PROBES,
    app_command,
    finish,
    launch,
    per_epoch,
    read_metrics,
    sigkill,
    wait_parked,
)

pytestmark = pytest.mark.slow


def _beacon(path: Path, block_at: str) -> str:
    return f"+callbacks.beacon={{_target_:{PROBES}.StepBeacon,path:'{path}',block_at:{block_at}}}"


def _last(run_dir: Path) -> dict:
    # weights_only: the hyper-parameters and every callback state are plain containers.
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


# Finetune: 2 epochs of 32 px in batches of 8, then 2 of 64 px in batches of 4; 41 training
# images -> 5 + 5 + 10 + 10 steps. Killed right after the switch (epoch 2, batch 3: the
# checkpoint is stage 1's), then in the middle of stage 2 (epoch 3, batch 4).
FT_STAGES = "schedule.stages=[{size:32,epochs:2,batch_size:8},{size:64,epochs:2,batch_size:4}]"
FT_SIZES = {0: 32.0, 1: 32.0, 2: 64.0, 3: 64.0}
FT_BATCHES = {0: 8.0, 1: 8.0, 2: 4.0, 3: 4.0}
FT_LAST_STEP = {0: 4, 1: 9, 2: 19, 3: 29}  # the step of each epoch's row (global_step - 1)


def test_finetune_killed_twice_resumes_with_auto_then_last(synthetic_root, tmp_path, reaper):
    experiment_dir = tmp_path / "runs" / "finetune" / "quick"
    run_dir = experiment_dir / "2030-01-01_00-00-00"
    beacon = tmp_path / "beacon.json"
    log = tmp_path / "out.log"
    common = [
        "experiment=quick",
        f"data.root={synthetic_root}",
        "data.num_workers=0",
        "data.pin_memory=false",
        "++trainer.enable_progress_bar=false",
        "logger=[csv]",
        "~callbacks.predictions",
        "test_after_fit=false",
        "schedule.eval_sizes=[32]",
        FT_STAGES,
        _beacon(beacon, "[[2,3],[3,4]]"),
    ]
    command = app_command("finetune", *common, f"hydra.run.dir={run_dir}")

    # 1. Killed in the first epoch of stage 2.
    proc = launch(command, tmp_path, log, reaper)
    state = wait_parked(proc, beacon, log)
    assert (state["epoch"], state["batch"]) == (2, 3)
    assert _last(run_dir)["epoch"] == 1  # the end-of-epoch checkpoint of stage 1
    sigkill(proc)

    # 2. The same command resumes (ckpt_path=auto) and is killed again, mid stage 2.
    proc = launch(command, tmp_path, log, reaper)
    state = wait_parked(proc, beacon, log)
    assert (state["epoch"], state["batch"]) == (3, 4)
    # It resumed at epoch 2's first batch: global step 10, no repeated stage-1 epoch.
    assert _last(run_dir)["epoch"] == 2 and _last(run_dir)["global_step"] == 20
    sigkill(proc)
    text = log.read_text()
    assert "resuming from" in text and "(epoch 1, step 10)" in text, text[-3000:]

    # 3. A new timestamped run with ckpt_path=last continues the latest run's directory.
    fresh = experiment_dir / "2030-01-01_00-10-00"
    last_command = app_command("finetune", *common, f"hydra.run.dir={fresh}", "ckpt_path=last")
    text = finish(launch(last_command, tmp_path, log, reaper), log)
    assert f"resuming the run in {run_dir}" in text
    assert "(epoch 2, step 20)" in text
    assert not fresh.exists(), "the fresh run directory of a continued run is left behind"
    assert sorted(p.name for p in experiment_dir.iterdir()) == [run_dir.name]

    df = read_metrics(run_dir)
    for column in ("train/global/loss", "train/total_loss", "val/32/global/loss"):
        assert set(per_epoch(df, column)) == {0, 1, 2, 3}, column
    assert per_epoch(df, "train/size") == FT_SIZES
    assert per_epoch(df, "train/batch_size") == FT_BATCHES
    assert per_epoch(df, "train/stage") == {0: 0.0, 1: 0.0, 2: 1.0, 3: 1.0}
    rows = df[df["train/global/loss"].notna()]
    assert dict(zip(rows["epoch"].astype(int), rows["step"].astype(int), strict=True)) == (
        FT_LAST_STEP
    )
    # No row of a step or epoch the final run never reached, and none twice.
    assert df["epoch"].dropna().max() == 3
    assert df["step"].dropna().max() <= 29
    assert not df.duplicated().any()

    last = _last(run_dir)
    assert last["epoch"] == 3
    assert last["global_step"] == 30
    assert isinstance(last["hyper_parameters"]["tasks"], dict)
    assert all(
        torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point()
    )


# Pretrain: 1 epoch of 32 px (batches of 8: 5 steps), then 2 of 48 px (batches of 16: 2 steps).
PT_STAGES = "schedule.stages=[{size:32,epochs:1,batch_size:8},{size:48,epochs:2,batch_size:16}]"


def _drop_epoch_rows(metrics: Path, epoch: int, column: str) -> int:
    """Deletes the epoch's row holding ``column``: as if killed between checkpoint and log."""
    with metrics.open(newline="") as handle:
        reader = csv.DictReader(handle)
        fields, rows = reader.fieldnames, list(reader)
    kept = [r for r in rows if not (r[column] and r["epoch"] and int(r["epoch"]) == epoch)]
    with metrics.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept)
    return len(rows) - len(kept)


def test_pretrain_killed_after_the_switch_resumes(synthetic_root, tmp_path, reaper):
    run_dir = tmp_path / "run"
    beacon = tmp_path / "beacon.json"
    log = tmp_path / "out.log"
    command = app_command(
        "pretrain",
        "experiment=quick",
        f"data.root={synthetic_root}",
        f"hydra.run.dir={run_dir}",
        "data.num_workers=0",
        "data.pin_memory=false",
        "++trainer.enable_progress_bar=false",
        "logger=[csv]",
        "method.projection.hidden_dim=64",
        "schedule.eval_sizes=[32]",
        PT_STAGES,
        _beacon(beacon, "[[1,1]]"),
    )
    proc = launch(command, tmp_path, log, reaper)
    state = wait_parked(proc, beacon, log)
    assert (state["epoch"], state["batch"], state["global_step"]) == (1, 1, 6)
    assert _last(run_dir)["epoch"] == 0
    sigkill(proc)
    assert not (run_dir / "backbone" / "model.safetensors").exists()
    # Also the narrow window between the checkpoint and the epoch's log row.
    assert _drop_epoch_rows(run_dir / "metrics.csv", 0, "train/loss") == 1

    text = finish(launch(command, tmp_path, log, reaper), log)
    assert "resuming from" in text and "(epoch 0, step 5)" in text
    assert "epoch 0's log row was written from the checkpoint" in text

    df = read_metrics(run_dir)
    assert set(per_epoch(df, "train/loss")) == {0, 1, 2}
    # The restored row holds what the lost one would have: no progress-bar-only values.
    assert "train/loss_step" not in df.columns
    assert set(per_epoch(df, "knn/tone/top1")) == {0, 1, 2}
    assert per_epoch(df, "train/size") == {0: 32.0, 1: 48.0, 2: 48.0}
    assert per_epoch(df, "train/batch_size") == {0: 8.0, 1: 16.0, 2: 16.0}
    last = _last(run_dir)
    assert (last["epoch"], last["global_step"]) == (2, 9)
    assert (run_dir / "backbone" / "model.safetensors").is_file()
