"""Spawning gloo process groups on CPU for the tests that compare N ranks with one process."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def spawn_gloo(worker: Callable[..., None], world: int, *args: Any) -> None:
    """Runs ``worker(rank, port, *args)`` in ``world`` processes and waits for them.

    The rendezvous store listens on a free port the kernel picks (port 0) and keeps it for
    the whole run: no window in which another process could take it.
    """
    store = dist.TCPStore("127.0.0.1", 0, world + 1, is_master=True, wait_for_workers=False)
    mp.spawn(worker, args=(store.port, *args), nprocs=world, join=True)


@contextmanager
def gloo_group(rank: int, port: int, world: int, timeout: timedelta) -> Iterator[None]:
    """Joins the spawned ranks' gloo group (one intra-op thread each) for the block; its
    rendezvous and its collectives time out after ``timeout``."""
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world + 1, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    try:
        yield
    finally:
        dist.destroy_process_group()


# Imported once by the fork server, so every rank starts with them loaded (a spawned rank
# would import torch & co. again: seconds each).
_PRELOAD = ["torch", "lightning", "timm", "segmentation_models_pytorch", "ssl_mt.models.multitask"]


def start_ranks(worker: Callable[..., None], world: int, *args: Any, join: bool = True) -> Any:
    """Starts ``worker(rank, *args)`` in ``world`` processes forked from a fork server.

    Not forked from the test process: one that has run autograd (a compiled graph's backward,
    say) may hold autograd's threads, and its forked children then fail at their first
    backward ("Unable to handle autograd's threading in combination with fork-based
    multiprocessing"), depending on which tests ran before. The fork server is a fresh
    interpreter that imported only :data:`_PRELOAD`.
    """
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    return mp.start_processes(worker, args=args, nprocs=world, join=join, start_method="forkserver")


def fork_ranks(
    worker: Callable[..., None], world: int, *args: Any, deadline_s: float
) -> tuple[list[int | None], float]:
    """Starts ``worker(rank, port, *args)`` in ``world`` processes (:func:`start_ranks`);
    waits ``deadline_s`` at most.

    For the tests of a rank that fails: no exception is raised here, whatever the ranks do.

    Returns:
        The exit codes (None: still running at the deadline, then killed) and the seconds
        until the last rank exited.
    """
    store = dist.TCPStore("127.0.0.1", 0, world + 1, is_master=True, wait_for_workers=False)
    start = time.monotonic()
    context = start_ranks(worker, world, store.port, *args, join=False)
    for process in context.processes:
        process.join(max(0.0, deadline_s - (time.monotonic() - start)))
    elapsed = time.monotonic() - start
    codes = [process.exitcode for process in context.processes]
    for process in context.processes:
        if process.is_alive():
            process.kill()
            process.join()
    return codes, elapsed
