"""What both Hydra apps do around ``trainer.fit``: seed, build the trainer, resume, report."""

from __future__ import annotations

import logging
import shutil
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from omegaconf import DictConfig, ListConfig, OmegaConf

from ssl_mt.callbacks.bad_samples import BadSampleLog
from ssl_mt.callbacks.run_summary import RunSummary
from ssl_mt.checkpointing import (
    LAST,
    AtomicCheckpointIO,
    RNGStateInCheckpoint,
    is_loadable,
    latest_run_with_checkpoint,
)
from ssl_mt.config import check_group_keys, check_top_level_keys, check_types
from ssl_mt.console import quiet_known_noise
from ssl_mt.loggers import EpochMetricsInCheckpoint, restore_epoch_row, truncate_after
from ssl_mt.safe_loading import HYDRA_OPT_IN, load_checkpoint_file
from ssl_mt.sync_batchnorm import TimmSyncBatchNorm

log = logging.getLogger(__name__)


# The datamodules resume a mid-epoch checkpoint at the next batch (EpochIndexSampler.skip_first),
# which Lightning cannot see; its warning that the loader "is not resumable" does not apply.
warnings.filterwarnings(
    "ignore", message="You're resuming from a checkpoint that ended before the epoch ended"
)
# Loaders are kept for a whole stage, not recreated per epoch (the case pytorch#91252 is about).
warnings.filterwarnings("ignore", message=".*can lead to instability due to limitations in PyTorch")


def check_untested_combinations(cfg: DictConfig) -> None:
    """Refuses settings that are known to fail together and have never been run here.

    Raises:
        ValueError: ``compile=true`` with ``trainer.sync_batchnorm=true``.
    """
    if cfg.get("compile") and cfg.trainer.get("sync_batchnorm"):
        raise ValueError(
            "compile=true with trainer.sync_batchnorm=true is refused: torch.compile (dynamo) "
            "is known to fail on SyncBatchNorm (pytorch/pytorch#107372, pytorch/pytorch#161302) "
            "and this combination has not been run on a GPU here. Set compile=false or "
            "trainer.sync_batchnorm=false."
        )


def prepare_run(cfg: DictConfig) -> Path:
    """Checks the config, seeds everything (workers too) and creates the run directory."""
    check_top_level_keys(cfg, cfg.app)
    check_group_keys(cfg)
    check_types(cfg)
    check_untested_combinations(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    # TF32 matmuls on Ampere+ GPUs: free speed, no effect on CPU.
    torch.set_float32_matmul_precision("high")
    return run_dir


def build_trainer(cfg: DictConfig, callbacks: Iterable[L.Callback] = ()) -> L.Trainer:
    """The Trainer of ``cfg.trainer`` with the configured loggers and callbacks.

    ``trainer.sync_batchnorm: true`` becomes timm's SyncBatchNorm conversion
    (:class:`ssl_mt.sync_batchnorm.TimmSyncBatchNorm`), never torch's, which drops the
    activation of timm's fused norm layers.
    """
    quiet_known_noise()
    loggers = [instantiate(node) for node in (cfg.get("logger") or {}).values() if node]
    configured = [instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node]
    run_dir = Path(cfg.run_dir)
    every = cfg.get("checkpoint_every_n_steps")
    if every:
        # No monitor: a step checkpoint must not wait for the next validation.
        configured.append(
            ModelCheckpoint(
                dirpath=run_dir / "checkpoints",
                filename="step{step:08d}",
                auto_insert_metric_name=False,
                every_n_train_steps=int(every),
                save_top_k=1,
                save_last=True,
                enable_version_counter=False,  # one last.ckpt, shared with the epoch callback
            )
        )
    if cfg.trainer.get("enable_progress_bar", True):
        # The bar reads its values from the device: every N batches, not every batch.
        configured.append(
            RichProgressBar(refresh_rate=int(cfg.get("progress_bar_refresh_rate", 10)))
        )
    return instantiate(
        cfg.trainer,
        logger=loggers or False,
        callbacks=[
            *configured,
            BadSampleLog(run_dir / "bad_samples.txt"),
            RunSummary(str(run_dir)),
            EpochMetricsInCheckpoint(),
            RNGStateInCheckpoint(),
            *callbacks,
        ],
        plugins=[
            AtomicCheckpointIO(),
            *([TimmSyncBatchNorm()] if cfg.trainer.get("sync_batchnorm") else []),
        ],
        sync_batchnorm=False,  # Lightning's flag means torch's converter
        default_root_dir=str(run_dir),
    )


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """The checkpoint to resume from, per ``cfg.ckpt_path``.

    - ``auto`` (default): RUN/checkpoints/last.ckpt (or a newer SLURM-requeue checkpoint
      RUN/hpc_ckpt_N.ckpt) when this run directory has one — so re-running the same command
      with the same ``hydra.run.dir`` resumes — else a new run;
    - ``last``: the same, and when this (new, timestamped) run directory has none, the most
      recent run of the same app and experiment — whose directory this run then continues;
    - ``null``: a new run; any other value: that checkpoint file.

    The run directory may change (``last``), so ``cfg.run_dir`` is updated in place. Every
    candidate is opened weights-only: one holding pickled Python objects is refused
    (:class:`~ssl_mt.safe_loading.UnsafeCheckpointError`) unless ``trust_checkpoint=true``.
    """
    value = cfg.get("ckpt_path")
    if value in (None, "", "null"):
        return None
    trust = trusts_checkpoints(cfg)
    run_dir = Path(cfg.run_dir)
    own = run_dir / "checkpoints" / LAST
    if value in ("auto", "last"):
        newest = newest_loadable([own, *run_dir.glob("hpc_ckpt_*.ckpt")], trust=trust)
        if newest is not None:
            return str(newest)
        if value == "auto":
            return None
        previous = latest_run_with_checkpoint(run_dir.parent, exclude=run_dir, trust=trust)
        if previous is None:
            raise FileNotFoundError(
                f"ckpt_path=last: no loadable checkpoints/{LAST} in {run_dir} nor in any run "
                f"below {run_dir.parent}"
            )
        log.info("resuming the run in %s", previous)
        _abandon_fresh_run_dir(run_dir)
        cfg.run_dir = str(previous)
        return str(previous / "checkpoints" / LAST)
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={value}: no such checkpoint file")
    load_checkpoint_file(path, trust=trust, opt_in=HYDRA_OPT_IN, mmap=True)  # refuses code
    return str(path)


def trusts_checkpoints(cfg: DictConfig) -> bool:
    """``trust_checkpoint=true``: the user allows full unpickling of the checkpoint to resume
    (only the boolean true; :func:`prepare_run` rejects other values)."""
    return cfg.get("trust_checkpoint", False) is True


def newest_loadable(paths: list[Path], trust: bool = False) -> Path | None:
    """The most recent loadable checkpoint among ``paths``: last.ckpt, or the one Lightning
    writes before a SLURM requeue (``hpc_ckpt_N.ckpt``), whichever is newer (see
    :func:`~ssl_mt.checkpointing.is_loadable` for ``trust``)."""
    existing = sorted(
        (p for p in paths if p.is_file()), key=lambda p: p.stat().st_mtime, reverse=True
    )
    return next((p for p in existing if is_loadable(p, trust=trust)), None)


def _abandon_fresh_run_dir(run_dir: Path) -> None:
    """Removes the folder Hydra just created for a run that continues another one."""
    # Only what Hydra writes at start-up: the composed config and the job's log.
    if run_dir.is_dir() and all(
        p.name == ".hydra" or p.suffix == ".log" for p in run_dir.iterdir()
    ):
        shutil.rmtree(run_dir, ignore_errors=True)


def prepare_resume(cfg: DictConfig, ckpt_path: str | None) -> None:
    """Before resuming, drops the log rows written after the checkpoint (kept otherwise)."""
    metrics = Path(cfg.run_dir) / "metrics.csv"
    if ckpt_path is None:
        if metrics.is_file():  # a run killed before its first checkpoint: it starts over
            aside = metrics.with_name(f"metrics.before-restart-{int(metrics.stat().st_mtime)}.csv")
            metrics.replace(aside)
            log.warning(
                "no checkpoint to resume from in %s: the run starts over; its old log is kept as %s",
                cfg.run_dir,
                aside.name,
            )
        return
    checkpoint = load_checkpoint_file(
        ckpt_path, trust=trusts_checkpoints(cfg), opt_in=HYDRA_OPT_IN, mmap=True
    )
    epoch, step = int(checkpoint.get("epoch", 0)), int(checkpoint.get("global_step", 0))
    dropped = truncate_after(metrics, epoch, step)
    if restore_epoch_row(metrics, checkpoint):
        log.info(
            "epoch %d's log row was written from the checkpoint (the run died before writing it)",
            epoch,
        )
    log.info(
        "resuming from %s (epoch %d, step %d); %d log rows after it dropped",
        ckpt_path,
        epoch,
        step,
        dropped,
    )


def plain(node: Any) -> Any:
    """A config node as plain Python containers (checkpoints load with ``weights_only``)."""
    if isinstance(node, DictConfig | ListConfig):
        return OmegaConf.to_container(node, resolve=True)
    return node


def backbone_kwargs(backbone_cfg: Any) -> dict[str, Any]:
    """The ``backbone`` config as :func:`ssl_mt.models.backbone.create_backbone` arguments."""
    kwargs = dict(plain(backbone_cfg))
    kwargs.pop("decoder_channels", None)
    return kwargs
