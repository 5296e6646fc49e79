"""Checkpoints that survive SIGKILL, and finding the one to resume from.

Lightning's default writer streams into a temporary file under the system temp directory
and then *moves* it; across file systems that move is a copy, which a kill can cut in half.
:class:`AtomicCheckpointIO` writes next to the target, fsyncs, and renames: a reader sees the
old checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)

LAST = "last.ckpt"


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` through a temporary file in the same folder + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO plugin writing every checkpoint atomically (local paths)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        atomic_torch_save(checkpoint, path)


def is_loadable(path: Path) -> bool:
    """Whether a checkpoint file opens (a torn file from another writer would not)."""
    try:
        torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as error:
        log.warning("checkpoint %s is not loadable (%s)", path, error)
        return False
    return True


def checkpoint_progress(path: str | Path) -> tuple[int, int]:
    """(epoch, global_step) stored in a Lightning checkpoint."""
    state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return int(state.get("epoch", 0)), int(state.get("global_step", 0))


def latest_run_with_checkpoint(experiment_dir: Path, exclude: Path | None = None) -> Path | None:
    """The most recent run folder below ``experiment_dir`` holding a loadable last.ckpt."""
    if not experiment_dir.is_dir():
        return None
    candidates = sorted(
        (p for p in experiment_dir.glob(f"*/checkpoints/{LAST}") if p.parent.parent != exclude),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for candidate in candidates:
        if is_loadable(candidate):
            return candidate.parent.parent
    return None
