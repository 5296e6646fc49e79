"""Helpers shared by the test modules: composing the apps' configs, reading error causes,
a bare CPU trainer."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from ssl_mt.config import compose

REPO = Path(__file__).resolve().parents[1]


def compose_app(app: str, overrides: Sequence[str]):
    """The composed config of ``pretrain`` or ``finetune`` with ``overrides``.

    ``run_dir`` (Hydra's output dir outside a Hydra app) defaults to a path no test writes;
    tests that run pass their own.
    """
    return compose(app, ["run_dir=/tmp/unused", *overrides])


def cause_chain(error: BaseException) -> list[BaseException]:
    """``error`` and the errors behind it (Hydra's instantiate wraps the real one)."""
    chain = [error]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    return chain


def app_env(home: Path) -> dict[str, str]:
    """The environment of an app launched by a test: this checkout first on the path, and
    the trackers' per-user folders in ``home`` (nothing written to the real home)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        env[name] = str(home / name.lower())
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def run_quick_app(app: str, overrides: list[str], home: Path) -> subprocess.CompletedProcess:
    """``python -m ssl_mt.<app> experiment=quick ...`` in a subprocess, output captured."""
    return subprocess.run(
        [sys.executable, "-m", f"ssl_mt.{app}", "experiment=quick", *overrides],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=home,
        env=app_env(home),
    )


def available_trackers() -> list[str]:
    """The optional trackers installed here (the ``mlflow`` and ``wandb`` extras)."""
    return [name for name in ("mlflow", "wandb") if importlib.util.find_spec(name) is not None]


def block_network(monkeypatch) -> None:
    """Makes every download fail: sockets, timm's pretrained loader, the Hub, torch.hub."""
    import socket

    import huggingface_hub
    import timm.models._builder
    import timm.models._hub
    import torch.hub

    def offline(*args, **kwargs):
        raise RuntimeError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", offline)
    monkeypatch.setattr(timm.models._builder, "load_pretrained", offline)
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", offline, raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)


def bare_trainer(root: Path, **settings):
    """A one-process CPU Trainer that writes nothing but what a test asks for: no logger,
    checkpoints, progress bar, summary or sanity check; dataloaders reloaded every epoch
    (as the apps' trainer config does). ``settings`` add to or replace these."""
    import lightning as L

    defaults = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "reload_dataloaders_every_n_epochs": 1,
        "default_root_dir": str(root),
    }
    return L.Trainer(**{**defaults, **settings})


def write_fake_curves(
    run_dir: Path, mean: Sequence[float], seed: int, images: int = 40, size: int = 96
) -> None:
    """Curve records (RUN/eval/curves) of a run: per epoch, per-image val losses around
    ``mean[epoch]`` for skin (every image) and tone (the first 10), image difficulty shared
    by every run."""
    import numpy as np
    import pandas as pd

    from ssl_mt.callbacks.curve_records import curve_path
    from ssl_mt.evaluation.records import write_records

    rng = np.random.default_rng(seed)
    difficulty = np.random.default_rng(0).normal(0.0, 1.0, images)
    names = [f"images/{i:03d}.jpg" for i in range(images)]
    for epoch, level in enumerate(mean):
        losses = level + difficulty + rng.normal(0.0, 0.3, images)
        rows = [
            pd.DataFrame({"image": names, "task": "skin", "loss": losses}),
            pd.DataFrame({"image": names[:10], "task": "tone", "loss": losses[:10] + 1.0}),
        ]
        table = pd.concat(rows, ignore_index=True)
        write_records(table, curve_path(run_dir / "eval" / "curves", size, epoch))
