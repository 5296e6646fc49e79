"""Evaluating a fine-tuning run's best and last checkpoints into per-image records.

The record format is :mod:`ssl_mt.evaluation.records`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ssl_mt.data.manifest import Sample
from ssl_mt.evaluation.records import (
    CHECKPOINT_INFO,
    CHECKPOINTS,
    RECORDS_DIR,
    THRESHOLD,
    TOP_K,
    as_records,
    records_path,
    write_records,
)
from ssl_mt.safe_loading import HYDRA_OPT_IN, load_checkpoint_file
from ssl_mt.tasks import TaskSpec

log = logging.getLogger(__name__)


# -- one batch ----------------------------------------------------------------------------------
def segmentation_counts(logits: Tensor, target: Tensor) -> dict[str, np.ndarray]:
    """Per-image pixel counts of (N, 1, H, W) logits against {0, 1} masks at threshold 0.5."""
    predicted = (logits.float().sigmoid() > THRESHOLD).flatten(1)
    truth = (target.flatten(1) > 0.5).to(predicted.device)
    counts = {
        "tp": predicted & truth,
        "fp": predicted & ~truth,
        "fn": ~predicted & truth,
        "tn": ~predicted & ~truth,
    }
    return {name: mask.sum(dim=1).cpu().numpy() for name, mask in counts.items()}


def classification_outcomes(logits: Tensor, target: Tensor) -> dict[str, np.ndarray]:
    """``target``, top-1 ``pred`` and (more than 5 classes) ``top5`` of (N, C) logits."""
    logits = logits.float()
    out = {"target": target.cpu().numpy(), "pred": logits.argmax(dim=1).cpu().numpy()}
    if logits.shape[1] > TOP_K:
        best = logits.topk(TOP_K, dim=1).indices
        out["top5"] = (best == target.to(best.device)[:, None]).any(dim=1).cpu().numpy()
    return out


def batch_records(
    tasks: Sequence[TaskSpec],
    losses: Mapping[str, Any],
    outputs: Mapping[str, Tensor],
    batch: Mapping[str, Any],
    images: Sequence[str],
) -> list[pd.DataFrame]:
    """The records of one evaluated batch: one frame per task, labeled images only.

    Args:
        tasks: The module's tasks.
        losses: Per task, the loss module (with ``per_sample(logits, target) -> (N,)``).
        outputs: Per task, the logits of the batch.
        batch: The collated batch (``target`` and ``present`` per task).
        images: The batch's image names, in batch order.
    """
    frames = []
    for task in tasks:
        present = batch["present"][task.name].bool().cpu().numpy()
        if not present.any():
            continue
        logits, target = (
            outputs[task.name],
            batch["target"][task.name].to(outputs[task.name].device),
        )
        columns: dict[str, Any] = {
            "image": [images[i] for i in np.flatnonzero(present)],
            "task": task.name,
            "loss": losses[task.name].per_sample(logits, target).float().cpu().numpy()[present],
        }
        if task.is_segmentation:
            parts = segmentation_counts(logits, target)
        else:
            parts = classification_outcomes(logits, target)
        columns.update({name: values[present].astype(np.int64) for name, values in parts.items()})
        frames.append(pd.DataFrame(columns))
    return frames


# -- evaluating a run's checkpoints -------------------------------------------------------------------
def image_name(sample: Sample, root: Path) -> str:
    """The image as written in ``labels.csv``: relative to the dataset root."""
    try:
        return sample.image.relative_to(root).as_posix()
    except ValueError:
        return sample.image.as_posix()


@torch.no_grad()
def evaluate(
    module: Any,
    loader: Any,
    samples: Sequence[Sample],
    root: Path,
    device: torch.device,
    forward_context: Any = contextlib.nullcontext,
) -> tuple[pd.DataFrame, int]:
    """Records of every labeled (image, task) of one loader; and the count of skipped images.

    ``module`` is a :class:`~ssl_mt.models.multitask.MultiTaskModule` in eval mode on
    ``device``; ``loader`` yields collated batches of ``samples`` with their ``index``.
    """
    frames: list[pd.DataFrame] = []
    skipped = 0
    for batch in loader:
        skipped += len(batch.get("bad_samples", ()))
        if "image" not in batch:
            continue
        images = [image_name(samples[int(i)], root) for i in batch["index"]]
        with forward_context():
            outputs = module(batch["image"].to(device, non_blocking=True))
        target = {name: value.to(device) for name, value in batch["target"].items()}
        frames += batch_records(
            module.tasks, module.losses, outputs, {**batch, "target": target}, images
        )
    return as_records(frames), skipped


def _checkpoint_files(trainer: Any, run_dir: Path) -> dict[str, Path]:
    from ssl_mt.checkpointing import LAST

    callback = trainer.checkpoint_callback
    files: dict[str, Path] = {}
    best = getattr(callback, "best_model_path", "") if callback is not None else ""
    if best and Path(best).is_file():
        files["best"] = Path(best)
    last = getattr(callback, "last_model_path", "") if callback is not None else ""
    candidate = Path(last) if last else run_dir / "checkpoints" / LAST
    if candidate.is_file():
        files["last"] = candidate
    return files


def _identity(checkpoint: Mapping[str, Any]) -> tuple[int, int]:
    return int(checkpoint.get("epoch", -1)), int(checkpoint.get("global_step", -1))


def _loaders(datamodule: Any, splits: Sequence[str]) -> Iterator[tuple]:
    """``(split, size, samples, loader)`` over every image of each split, one loader per eval
    size: the datamodule's own evaluation loaders (one process: the very loaders of
    validation, whose batches may already be held in memory), unsharded under DDP."""
    for split in splits:
        samples = datamodule.samples[split]
        loaders = datamodule.eval_loaders(split, sharded=False)
        for size, loader in zip(datamodule.eval_sizes, loaders, strict=True):
            yield split, size, samples, loader


def write_eval_records(
    trainer: Any, module: Any, datamodule: Any, run_dir: str | Path, trust: bool = False
) -> list[Path]:
    """Evaluates the best and last checkpoints and writes their records (global rank 0 only).

    A plain loop without collectives: the other ranks are done by then. A checkpoint that
    is missing (no ``ModelCheckpoint``, or nothing saved yet) is named in the log; when best
    and last are the same training state, the last one's records are a copy of the best's.
    Checkpoints load weights-only; ``trust`` (``trust_checkpoint=true``) allows full unpickling.

    Returns:
        The records files written.
    """
    if trainer.global_rank != 0:
        return []
    run_dir = Path(run_dir)
    files = _checkpoint_files(trainer, run_dir)
    for tag in CHECKPOINTS:
        if tag not in files:
            log.warning("no %s checkpoint in %s: no evaluation records for it", tag, run_dir)
    if not files:
        return []
    splits = ["val", *(["test"] if datamodule.samples.get("test") else [])]
    device = trainer.strategy.root_device
    module.to(device).eval()
    loaders = list(_loaders(datamodule, splits))
    written: list[Path] = []
    done: dict[tuple[int, int], str] = {}
    for tag, path in files.items():
        checkpoint = load_checkpoint_file(path, trust=trust, opt_in=HYDRA_OPT_IN, mmap=True)
        identity = _identity(checkpoint)
        info = {"checkpoint": str(path), "epoch": identity[0], "global_step": identity[1]}
        info_path = run_dir / RECORDS_DIR / tag / CHECKPOINT_INFO
        info_path.parent.mkdir(parents=True, exist_ok=True)
        info_path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if identity in done:  # best == last: the same weights, the same records
            for split, size, _, _ in loaders:
                source = records_path(run_dir, done[identity], split, size)
                written.append(shutil.copyfile(source, records_path(run_dir, tag, split, size)))
            continue
        module.load_state_dict(checkpoint["state_dict"])
        for split, size, samples, loader in loaders:
            table, skipped = evaluate(
                module,
                loader,
                samples,
                datamodule.root,
                device,
                trainer.precision_plugin.forward_context,
            )
            if skipped:
                log.warning("%s %s@%d: %d unreadable image(s) left out", tag, split, size, skipped)
            written.append(write_records(table, records_path(run_dir, tag, split, size)))
        done[identity] = tag
    log.info("evaluation records: %s", run_dir / RECORDS_DIR)
    return written
