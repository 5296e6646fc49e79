"""Collectives that every rank makes whatever its shard holds."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def gather_rows(x: Tensor) -> Tensor:
    """``x`` of every rank concatenated along dim 0, in rank order; ranks may hold any number
    of rows, none included.

    Every rank makes the same two collectives whatever it holds: an ``all_gather`` of the
    shapes, then one of the rows padded to the longest shard (``all_gather`` needs tensors
    of one shape on every rank; Lightning's ``self.all_gather`` does no padding). ``x`` must
    have the same number of dimensions and dtype on every rank; an empty shard's trailing
    sizes may differ (a rank with no batch does not know the feature width): the widest wins.

    Raises:
        ValueError: two non-empty shards differ in a trailing size.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    world = dist.get_world_size()
    shape = torch.tensor(x.shape, dtype=torch.long, device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    table = torch.stack(shapes).cpu()
    rows = table[:, 0].tolist()
    filled = table[table[:, 0] > 0, 1:]
    if len(filled) and (filled != filled[0]).any():
        raise ValueError(f"gather_rows: the ranks' shards differ beyond dim 0: {table.tolist()}")
    top = [max(rows), *table[:, 1:].max(dim=0).values.tolist()]
    padded = x.new_zeros(top)
    padded[tuple(slice(0, size) for size in x.shape)] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, rows, strict=True)])
