"""A checkpoint write killed at any moment leaves the previous checkpoint, never a torn file.

A forked child writes a large checkpoint over a valid older one with
:func:`ssl_mt.checkpointing.atomic_torch_save` and is SIGKILLed while its temporary file
grows (at several sizes, from "just created" to "written, not yet renamed"), and once after
it finished. The target must always load and hold exactly the old or the new content; the
stray temporary files the kills leave must never be taken for a checkpoint. (They are what a
plain ``torch.save(obj, path)`` would have left at PATH: torn files that do not load.)
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ssl_mt.checkpointing import atomic_torch_save, is_loadable, latest_run_with_checkpoint
from ssl_mt.runner import resolve_ckpt_path

NUMEL = 50 * 2**20  # 200 MB of float32


def _payload(version: int) -> dict:
    return {"version": version, "data": torch.full((NUMEL,), float(version))}


def _write(path: str, version: int, ready) -> None:  # in the forked child
    payload = _payload(version)
    ready.set()
    atomic_torch_save(payload, path)
    os._exit(0)


def _content(path: Path) -> int:
    """The version a checkpoint holds, after checking its whole tensor is that version."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    data = state["data"]
    assert data.numel() == NUMEL
    assert bool((data[:: 2**16] == state["version"]).all()) and float(data[-1]) == state["version"]
    return int(state["version"])


def _temps(folder: Path) -> list[Path]:
    return sorted(folder.glob(".last.ckpt.tmp-*"))


def _kill_while_writing(
    path: Path, version: int, at_bytes: float | None, deadline_s: float
) -> bool:
    """Starts a writer; SIGKILLs it once its temp file reaches ``at_bytes`` (None: when it
    exits by itself). True when the kill landed before the rename (its temp file is left)."""
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    child = context.Process(target=_write, args=(str(path), version, ready))
    before = set(_temps(path.parent))
    child.start()
    assert ready.wait(60)
    deadline = time.monotonic() + deadline_s
    if at_bytes is None:
        child.join(deadline_s)
        assert child.exitcode == 0
        return False
    tmp = path.with_name(f".{path.name}.tmp-{child.pid}")
    while time.monotonic() < deadline and child.is_alive():
        if tmp.exists() and tmp.stat().st_size >= at_bytes:
            break
        time.sleep(0.002)
    os.kill(child.pid, signal.SIGKILL)
    child.join(30)
    return bool(set(_temps(path.parent)) - before)


@pytest.mark.slow
def test_a_killed_checkpoint_write_leaves_the_old_or_the_new_file(tmp_path):
    experiment = tmp_path / "runs" / "finetune" / "quick"
    path = experiment / "2030-01-01_00-00-00" / "checkpoints" / "last.ckpt"
    started = time.monotonic()
    atomic_torch_save(_payload(0), path)
    full_write_s = time.monotonic() - started
    size = path.stat().st_size
    assert _content(path) == 0

    rng = random.Random(0)
    current, torn = 0, 0
    # Kill points: a temp file just created, random sizes, completely written (fsync/rename
    # pending), and one write that finishes.
    points = [0, *(rng.uniform(0.05, 0.95) * size for _ in range(3)), size, None]
    partial_seen = 0
    for version, at_bytes in enumerate(points, start=1):
        torn += _kill_while_writing(path, version, at_bytes, deadline_s=30 + 20 * full_write_s)
        found = _content(path)  # loads: never a torn file
        assert found in (current, version), (found, current, version)
        if at_bytes is not None and at_bytes < size:
            assert found == current, "a write killed half-way replaced the checkpoint"
        current = found
        # What a non-atomic writer would have left at PATH: a torn file, which does not load.
        for leftover in _temps(path.parent):
            if leftover.stat().st_size < size:
                partial_seen += 1
                assert not is_loadable(leftover)
        # The next write removes the temporaries of writers that died: at most one stays.
        assert len(_temps(path.parent)) <= 1
    assert current == len(points), "the write that was not killed did not land"
    assert torn >= 4, f"only {torn} kills landed during a write: the test did not test much"
    assert partial_seen, "no torn temp file was ever left: nothing to mistake for a checkpoint"
    assert not _temps(path.parent), "the finished write left a dead writer's temp file behind"

    # A newer run whose very first checkpoint write was killed: only a stray temp file.
    newer = experiment / "2030-01-01_00-10-00" / "checkpoints" / "last.ckpt"
    _kill_while_writing(newer, 99, size / 2, deadline_s=30 + 20 * full_write_s)
    assert not newer.exists() and _temps(newer.parent)
    assert is_loadable(path)
    assert latest_run_with_checkpoint(experiment) == path.parent.parent
    cfg = OmegaConf.create({"ckpt_path": "auto", "run_dir": str(newer.parent.parent)})
    assert resolve_ckpt_path(cfg) is None  # auto: that run has no checkpoint, starts over
    cfg = OmegaConf.create({"ckpt_path": "last", "run_dir": str(newer.parent.parent)})
    assert resolve_ckpt_path(cfg) == str(path)  # last: the previous run's real checkpoint
    assert cfg.run_dir == str(path.parent.parent)

    for leftover in [*_temps(path.parent), *_temps(newer.parent), path]:
        leftover.unlink()  # 200 MB each: do not leave them in pytest's kept temp folders
