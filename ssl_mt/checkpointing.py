"""Checkpoints that survive SIGKILL, and finding the one to resume from.

Lightning's default writer streams into a temporary file under the system temp directory
and then *moves* it; across file systems that move is a copy, which a kill can cut in half.
:class:`AtomicCheckpointIO` writes next to the target, fsyncs, and renames: a reader sees the
old checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ssl_mt.safe_loading import HYDRA_OPT_IN, UnsafeCheckpointError, load_checkpoint_file

log = logging.getLogger(__name__)

LAST = "last.ckpt"
# A fine-tuning run writes its best checkpoint as best_epoch{NNN}.ckpt (conf/callbacks/
# finetune.yaml); RUN/checkpoints/best.ckpt is the stable name predict and export accept.
BEST = "best.ckpt"
BEST_GLOB = "best_epoch*.ckpt"
BEST_INFO = Path("eval") / "best" / "checkpoint.json"  # ssl_mt.evaluation.records writes it


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Deletes temporary files a killed writer left next to ``path`` (their pid is gone)."""
    removed = []
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` through a temporary file in the same folder + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
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

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Lightning's restores (``fit``/``test`` with ``ckpt_path``): weights-only unless the
        caller passes ``weights_only=False`` (``trust_checkpoint=true``); Lightning's unset
        ``None`` never falls back to full unpickling (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``)."""
        return load_checkpoint_file(
            path,
            trust=weights_only is False,
            opt_in=HYDRA_OPT_IN,
            map_location=map_location or "cpu",
        )


def resolve_best(path: str | Path) -> Path:
    """``RUN/checkpoints/best.ckpt`` as the run's best checkpoint, ``best_epoch{NNN}.ckpt``.

    A path that exists, or is not named ``best.ckpt``, is returned as it is. A missing
    ``best.ckpt`` is the file that ``RUN/eval/best/checkpoint.json`` (written at the end of
    fit) names, when it is in the folder, else the only ``best_epoch*.ckpt`` there.

    Raises:
        FileNotFoundError: No best checkpoint in the folder, or several and none recorded.
    """
    path = Path(path)
    if path.name != BEST or path.exists():
        return path
    folder = path.parent
    info = folder.parent / BEST_INFO
    recorded = None
    if info.is_file():
        try:
            recorded = json.loads(info.read_text(encoding="utf-8")).get("checkpoint")
        except (ValueError, AttributeError):
            recorded = None
    if isinstance(recorded, str) and (folder / Path(recorded).name).is_file():
        best = folder / Path(recorded).name
    else:
        found = sorted(folder.glob(BEST_GLOB))
        if len(found) != 1:
            what = (
                f"{len(found)} best checkpoints ({', '.join(p.name for p in found)}) and "
                f"{info} names none of them"
                if found
                else f"no {BEST_GLOB} (a fine-tuning run writes its best checkpoint there)"
            )
            raise FileNotFoundError(f"checkpoint not found: {path}; {folder} has {what}")
        best = found[0]
    log.info("%s is the run's best checkpoint: %s", path, best)
    return best


def is_loadable(path: Path, trust: bool = False) -> bool:
    """Whether a checkpoint file opens (a torn file from another writer would not).

    Raises:
        UnsafeCheckpointError: The file holds pickled Python objects and ``trust``
            (``trust_checkpoint=true``) is not given: refused, never taken for a torn file.
    """
    try:
        load_checkpoint_file(path, trust=trust, opt_in=HYDRA_OPT_IN, mmap=True)
    except UnsafeCheckpointError:
        raise
    except Exception as error:
        log.warning("checkpoint %s is not loadable (%s)", path, error)
        return False
    return True


def latest_run_with_checkpoint(
    experiment_dir: Path, exclude: Path | None = None, trust: bool = False
) -> Path | None:
    """The most recent run folder below ``experiment_dir`` holding a loadable last.ckpt
    (see :func:`is_loadable` for ``trust``)."""
    if not experiment_dir.is_dir():
        return None
    candidates = sorted(
        (p for p in experiment_dir.glob(f"*/checkpoints/{LAST}") if p.parent.parent != exclude),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for candidate in candidates:
        if is_loadable(candidate, trust=trust):
            return candidate.parent.parent
    return None


RNG_KEY = "ssl_mt_rng_state"


class RNGStateInCheckpoint(L.Callback):
    """Saves the random generators' states in every checkpoint and restores them on resume.

    Lightning restores weights, optimiser, schedulers and loops, but not the global random
    generators that dropout, stochastic depth and any on-device randomness draw from. With
    them restored, a run resumed on one process continues bit for bit (data augmentation is
    seeded per sample and does not depend on them). Under DDP only rank 0's state is in the
    file, so each rank is reseeded from (rank 0's state, rank) instead.
    """

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        version, internal, gauss_next = random.getstate()
        # Tensors and plain scalars only: checkpoints must load with weights_only=True.
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": {
                "kind": kind,
                "keys": torch.from_numpy(keys.astype(np.int64)),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "gauss": float(gauss),
            },
            "python": {
                "version": version,
                "internal": torch.tensor(internal, dtype=torch.int64),
                "gauss_next": gauss_next,
            },
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint[RNG_KEY] = state

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state = checkpoint.get(RNG_KEY)
        if not state:
            return
        torch.set_rng_state(state["torch"])
        numpy_state = state["numpy"]
        np.random.set_state(
            (
                numpy_state["kind"],
                numpy_state["keys"].numpy().astype(np.uint32),
                numpy_state["pos"],
                numpy_state["has_gauss"],
                numpy_state["gauss"],
            )
        )
        python_state = state["python"]
        random.setstate(
            (
                python_state["version"],
                tuple(python_state["internal"].tolist()),
                python_state["gauss_next"],
            )
        )
        if (
            "cuda" in state
            and torch.cuda.is_available()
            and len(state["cuda"]) == torch.cuda.device_count()
        ):
            torch.cuda.set_rng_state_all(state["cuda"])
        if trainer.world_size > 1:
            seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) + 1_000_003 * trainer.global_rank
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)
