"""MLflow and Weights & Biases through ``logger=[...]``: after a quick run, the metrics are
read back from each tracker's own store with the tracker's own client."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from ssl_mt.trackers import RUN_DIR_TAG
from tests.helpers import compose_app

pytestmark = pytest.mark.slow

VAL_LOSS = "val/32/global/loss"


def _csv_values(run_dir: Path, key: str) -> list[float]:
    table = pd.read_csv(run_dir / "metrics.csv")
    return table[key].dropna().tolist()


def test_mlflow_store_holds_the_run_metrics(quick_finetune_run) -> None:
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    from mlflow.tracking import MlflowClient

    run_dir, _ = quick_finetune_run
    assert (run_dir / "mlflow.db").is_file()
    client = MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
    experiment = client.get_experiment_by_name("finetune/quick")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags[RUN_DIR_TAG] == str(run_dir.resolve())
    history = client.get_metric_history(run.info.run_id, VAL_LOSS)
    assert [m.value for m in history] == pytest.approx(_csv_values(run_dir, VAL_LOSS))
    assert {"train/global/loss", "val/32/skin/dice", "val/32/tone/top1"} <= set(run.data.metrics)
    assert run.data.params  # the module's hyper-parameters


def test_wandb_offline_run_holds_the_run_metrics(quick_finetune_run) -> None:
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    run_dir, _ = quick_finetune_run
    (offline,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    # wandb's own reader of its transaction log; it needs no network and no account.
    wandb_cli = shutil.which("wandb", path=str(Path(sys.executable).parent)) or "wandb"
    inspect = subprocess.run(
        [wandb_cli, "leet", "inspect", "--json", str(offline)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if inspect.returncode != 0 and "No such command" in inspect.stderr:
        pytest.skip("this wandb has no `wandb leet inspect` (its offline reader, wandb >= 0.31)")
    assert inspect.returncode == 0, inspect.stderr
    records = inspect.stdout
    history = [
        record["history"]["item"]
        for record in map(json.loads, filter(None, records.splitlines()))
        if record.get("type") == "history"
    ]
    logged = [row[VAL_LOSS] for row in history if VAL_LOSS in row]
    assert logged == pytest.approx(_csv_values(run_dir, VAL_LOSS))
    assert any("train/global/loss" in row for row in history)


def test_a_resumed_run_continues_its_mlflow_run(quick_finetune_run) -> None:
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    from hydra.utils import instantiate
    from mlflow.tracking import MlflowClient

    run_dir, _ = quick_finetune_run
    client = MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
    (before,) = client.search_runs([client.get_experiment_by_name("finetune/quick").experiment_id])
    # What the same command builds when it is re-run (same run directory) to resume.
    cfg = compose_app("finetune", ["experiment=quick", "logger=[mlflow]", f"run_dir={run_dir}"])
    again = instantiate(cfg.logger.mlflow)
    again.log_metrics({"resumed/probe": 1.0}, step=99)
    assert again.run_id == before.info.run_id
    history = client.get_metric_history(before.info.run_id, "resumed/probe")
    assert [(m.step, m.value) for m in history] == [(99, 1.0)]


def test_only_rank_zero_opens_the_mlflow_store(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    from hydra.utils import instantiate
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", 1)  # as in a DDP process other than rank 0
    cfg = compose_app("finetune", ["logger=[mlflow]", f"run_dir={tmp_path}"])
    logger = instantiate(cfg.logger.mlflow)
    logger.log_metrics({"loss": 1.0}, step=0)
    assert not (tmp_path / "mlflow.db").exists()
