"""What both Hydra apps do around ``trainer.fit``: seed, build the trainer, resume, report."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from ssl_mt.callbacks.bad_samples import BadSampleLog

log = logging.getLogger(__name__)


def prepare_run(cfg: DictConfig) -> Path:
    """Seeds everything (workers too) and creates the run directory."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    # TF32 matmuls on Ampere+ GPUs: free speed, no effect on CPU.
    torch.set_float32_matmul_precision("high")
    return run_dir


def build_trainer(cfg: DictConfig, callbacks: Iterable[L.Callback] = ()) -> L.Trainer:
    """The Trainer of ``cfg.trainer`` with the configured loggers and callbacks."""
    loggers = [instantiate(node) for node in (cfg.get("logger") or {}).values() if node]
    configured = [instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node]
    run_dir = Path(cfg.run_dir)
    return instantiate(
        cfg.trainer,
        logger=loggers or False,
        callbacks=[*configured, BadSampleLog(run_dir / "bad_samples.txt"), *callbacks],
        default_root_dir=str(run_dir),
    )


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """``ckpt_path``: null → None; ``last`` → RUN/checkpoints/last.ckpt; else an existing path."""
    value = cfg.get("ckpt_path")
    if value in (None, ""):
        return None
    if value == "last":
        path = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise FileNotFoundError(
                f"ckpt_path=last but {path} does not exist: resume needs the run's directory "
                "(hydra.run.dir=THAT_RUN)"
            )
        return str(path)
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={value}: no such checkpoint file")
    return str(path)


def backbone_kwargs(backbone_cfg: Any) -> dict[str, Any]:
    """The ``backbone`` config as :func:`ssl_mt.models.backbone.create_backbone` arguments."""
    kwargs = dict(backbone_cfg)
    kwargs.pop("decoder_channels", None)
    return kwargs
