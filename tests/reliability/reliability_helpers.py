"""Helpers of the reliability tests: composing the apps, launching them, reading their logs.

2 shared CPU cores: every run is tiny (32-64 px, a few dozen images, one intra-op thread)
and subprocesses are few (each pays ~10 s of imports).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from tests.helpers import cause_chain, compose_app  # noqa: F401 - re-exported to the tests

HERE = Path(__file__).resolve().parent

PROBES = "reliability_probes"
# A subprocess that imports torch + lightning + timm on a loaded 2-core box needs ~10-20 s.
START_TIMEOUT_S = 240


def tiny_overrides(app: str, root: Path, *extra: str) -> list[str]:
    """The quick profile, made smaller: no workers, no extras that cost time."""
    common = [
        "experiment=quick",
        f"data.root={root}",
        "++trainer.enable_progress_bar=false",
        "data.num_workers=0",
        "data.pin_memory=false",
        "logger=[csv]",
    ]
    if app == "finetune":
        common += ["~callbacks.predictions", "test_after_fit=false", "schedule.eval_sizes=[32]"]
    else:
        common += ["schedule.eval_sizes=[32]", "method.projection.hidden_dim=64"]
    return [*common, *extra]


def tiny_cfg(app: str, root: Path, run_dir: Path, *extra: str):
    return compose_app(app, tiny_overrides(app, root, f"run_dir={run_dir}", *extra))


def run_app(app: str, cfg) -> Path:
    if app == "finetune":
        from ssl_mt.finetune import run
    else:
        from ssl_mt.pretrain import run
    return run(cfg)


def read_metrics(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "metrics.csv")


def per_epoch(df: pd.DataFrame, column: str) -> dict[int, float]:
    """``{epoch: value}`` of an epoch-level column; fails on a repeated epoch."""
    rows = df[df[column].notna()]
    epochs = [int(e) for e in rows["epoch"]]
    assert len(epochs) == len(set(epochs)), f"{column}: repeated epochs {sorted(epochs)}"
    return dict(zip(epochs, rows[column].astype(float), strict=True))


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH")) if p),
        PYTHONUNBUFFERED="1",
        HYDRA_FULL_ERROR="1",
    )
    return env


def app_command(app: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", f"ssl_mt.{app}", *overrides]


def launch(command: Sequence[str], cwd: Path, log: Path, reaper: list) -> subprocess.Popen:
    """Starts a run, output appended to ``log``; ``reaper`` (the fixture) kills it if left."""
    with log.open("ab") as handle:
        process = subprocess.Popen(
            list(command), cwd=cwd, env=subprocess_env(), stdout=handle, stderr=subprocess.STDOUT
        )
    reaper.append(process)
    return process


def finish(proc: subprocess.Popen, log: Path, timeout: float = START_TIMEOUT_S) -> str:
    """Waits for a launched run; returns its output; fails with the output on exit != 0."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"run timed out:\n{log.read_text()[-4000:]}") from None
    text = log.read_text()
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{text[-6000:]}"
    return text


def wait_parked(proc: subprocess.Popen, beacon: Path, log: Path, timeout: float = START_TIMEOUT_S):
    """Waits until the StepBeacon parks the process; returns its state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"run ended (exit {proc.returncode}) before parking:\n{log.read_text()[-6000:]}"
            )
        try:
            state = json.loads(beacon.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            state = {}
        if state.get("parked") and state.get("pid") == proc.pid:
            return state
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"the run never parked:\n{log.read_text()[-6000:]}")


def sigkill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
