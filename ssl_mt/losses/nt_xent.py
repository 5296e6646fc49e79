"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR, correct under DDP.

- [0] SimCLR, 2020, https://arxiv.org/abs/2002.05709

Under DDP the negatives of every anchor are the embeddings of ALL ranks. They are gathered
with ``torch.distributed.nn.functional.all_gather``, whose backward sends each rank the
gradient the other ranks' losses put on its embeddings; a plain ``all_gather`` (no
gradient) silently trains only on the local part of the similarity matrix.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_mt.losses.precision import autocast_off


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenates ``x`` from every rank in rank order, keeping the autograd graph."""
    world, _ = _world()
    if world == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def nt_xent_logits(z1: Tensor, z2: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Similarity logits of the local anchors against every embedding of every rank.

    Args:
        z1: (B, D) first views of this rank's images.
        z2: (B, D) second views, row i pairs with row i of ``z1``.
        temperature: Softmax temperature (> 0).

    Returns:
        ``(logits, targets)``: logits (2B, 2N) over the 2N global embeddings, the anchor's
        own column set to -inf, and the column of each anchor's positive. N = B × world.
        The logits are float32, also under autocast.
    """
    world, rank = _world()
    batch = z1.shape[0]
    with autocast_off(z1):
        z1 = F.normalize(z1.float(), dim=1)
        z2 = F.normalize(z2.float(), dim=1)
        all_z = torch.cat([gather_with_grad(z1), gather_with_grad(z2)], dim=0)  # (2N, D)
        anchors = torch.cat([z1, z2], dim=0)  # (2B, D)
        logits = anchors @ all_z.T / temperature  # (2B, 2N)
    n_global = batch * world
    local = torch.arange(batch, device=z1.device) + rank * batch
    self_cols = torch.cat([local, local + n_global])
    # masked_fill rather than boolean indexing: no host-device synchronisation.
    self_mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, self_cols[:, None], True)
    logits = logits.masked_fill(self_mask, float("-inf"))
    targets = torch.cat([local + n_global, local])
    return logits, targets


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float = 0.1) -> Tensor:
    """Mean NT-Xent over this rank's 2B anchors, negatives from all ranks.

    With DDP's gradient averaging, the gradient equals that of the loss of one process on
    the concatenated global batch.
    """
    logits, targets = nt_xent_logits(z1, z2, temperature)
    with autocast_off(logits):
        return F.cross_entropy(logits, targets)


class NTXentLoss(nn.Module):
    """Module form of :func:`nt_xent_loss`.

    Args:
        temperature: Softmax temperature, > 0 (0.1 in the reference setup).
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        if z1.shape != z2.shape or z1.ndim != 2:
            raise ValueError(
                f"expected two (B, D) tensors of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}"
            )
        return nt_xent_loss(z1, z2, self.temperature)
