"""Fixtures shared by the whole test suite."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ssl_mt.config import load_tasks_config
from ssl_mt.data.synthetic import generate_dataset
from ssl_mt.tasks import TaskSpec, parse_tasks
from tests.helpers import available_trackers, run_quick_app


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset in the manifest format: 48 images of 64 px, seed 0.

    Shared by the session: copy it (``shutil.copytree``) before modifying anything.
    """
    root = tmp_path_factory.mktemp("synthetic") / "data"
    # train and val only (the counts the tests state: 41 train, 7 val); the default test
    # split is covered by tests/data/test_synthetic.py and the comparison tests.
    return generate_dataset(
        root, n=48, size=64, seed=0, test_fraction=0.0, workers=1, progress=False
    )


@pytest.fixture(scope="session")
def default_tasks() -> list[TaskSpec]:
    """The five tasks of ``conf/tasks/default.yaml``."""
    return parse_tasks(load_tasks_config("default"))


@pytest.fixture(autouse=True)
def _one_thread():
    """2 shared cores: intra-op threads of the tiny test models only fight each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def quick_finetune_run(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """One epoch of the quick fine-tuning profile, launched as a user does, logging to csv
    and every installed tracker. Returns (run directory, console output)."""
    home = tmp_path_factory.mktemp("quick_finetune")
    run_dir = home / "run"
    loggers = ",".join(["csv", *available_trackers()])
    result = run_quick_app(
        "finetune",
        [
            f"data.root={synthetic_root}",
            f"hydra.run.dir={run_dir}",
            "schedule.stages=[{size:32,epochs:1,batch_size:8}]",
            "schedule.eval_sizes=[32]",
            f"logger=[{loggers}]",
            "test_after_fit=false",
        ],
        home,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return run_dir, output
