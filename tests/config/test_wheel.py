"""The built wheel carries conf/: installed elsewhere (``--no-deps`` into a folder, the
dependencies from this environment), it composes and runs a quick fine-tune with a user's
experiment, from a directory that is not the repo."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

EXPERIMENT = """# @package _global_
defaults:
  - quick

experiment_name: mine
schedule:
  stages: [{size: 32, epochs: 1, batch_size: 8}]
  eval_sizes: [32]
data:
  num_workers: 0
  pin_memory: false
test_after_fit: false
eval_records: false
"""


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout: int = 400) -> str:
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_wheel_installed_elsewhere_runs_a_quick_finetune(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    dist = tmp_path / "dist"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(ROOT),
        ],
        cwd=tmp_path,
        env=env,
    )
    (wheel,) = dist.glob("ssl_mt-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {"ssl_mt/conf/finetune.yaml", "ssl_mt/conf/experiment/quick.yaml"} <= names
    target = tmp_path / "site"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        cwd=tmp_path,
        env=env,
    )

    work = tmp_path / "elsewhere"
    (work / "my_conf" / "experiment").mkdir(parents=True)
    (work / "my_conf" / "experiment" / "mine.yaml").write_text(EXPERIMENT)
    env["PYTHONPATH"] = str(target)  # ssl_mt from the install only; its dependencies from here
    where = _run([sys.executable, "-c", "import ssl_mt; print(ssl_mt.__file__)"], work, env)
    assert Path(where.strip()).is_relative_to(target), where
    _run(
        [
            sys.executable,
            "-m",
            "ssl_mt.data",
            "generate",
            "--out",
            "data",
            "--n",
            "24",
            "--size",
            "32",
            "--seed",
            "3",
        ],
        cwd=work,
        env=env,
    )
    _run(
        [
            sys.executable,
            "-m",
            "ssl_mt.finetune",
            f"hydra.searchpath=[file://{work / 'my_conf'}]",
            "experiment=mine",
            "data.root=data",
            "hydra.run.dir=run",
            "logger=[csv]",
            "~callbacks.predictions",
            "++trainer.enable_progress_bar=false",
        ],
        cwd=work,
        env=env,
    )
    run_dir = work / "run"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert "val/32/global/loss" in (run_dir / "metrics.csv").read_text()
    assert "experiment_name: mine" in (run_dir / ".hydra" / "config.yaml").read_text()
