"""Spawning gloo process groups on CPU for the tests that compare N ranks with one process."""

from __future__ import annotations

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
    """Joins the spawned ranks' gloo group (one intra-op thread each) for the block."""
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world + 1, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()
