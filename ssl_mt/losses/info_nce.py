"""InfoNCE with a queue of negatives (MoCo): the loss, the queue and its cross-rank filling.

- [0] MoCo, 2020, https://arxiv.org/abs/1911.05722 (Eq. 1, the queue)
- [1] MoCo v2, 2020, https://arxiv.org/abs/2003.04297

Each query's positive is its own key; its negatives are the K keys of the queue, which hold
the keys of earlier batches of every rank. Keys come from the momentum encoder and carry no
gradient, so a plain ``all_gather`` suffices to share them. Shuffling BN's cross-rank
shuffle of the key batch lives here too: the distributed pieces of MoCo, free of Lightning.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_mt.losses.precision import autocast_off


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """Concatenates ``x`` (same shape on every rank) from every rank, in rank order."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def info_nce_logits(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """Logits of each query against its key (column 0) and the queue (columns 1..K).

    Args:
        q: (B, D) queries (normalised here).
        k: (B, D) keys, row i the positive of query i (normalised here; no gradient).
        queue: (K, D) l2-normalised negative keys.
        temperature: Softmax temperature (> 0).

    Returns:
        (B, 1 + K) logits, float32 also under autocast; the target class of every row is 0.
    """
    with autocast_off(q):
        q = F.normalize(q.float(), dim=1)
        k = F.normalize(k.detach().float(), dim=1)
        positive = (q * k).sum(dim=1, keepdim=True)
        negative = q @ queue.detach().float().T
        return torch.cat([positive, negative], dim=1) / temperature


def info_nce_loss(q: Tensor, k: Tensor, queue: Tensor, temperature: float = 0.2) -> Tensor:
    """Mean InfoNCE over the B queries: ``−log softmax(logits)[positive]``."""
    logits = info_nce_logits(q, k, queue, temperature)
    with autocast_off(logits):
        return F.cross_entropy(logits, logits.new_zeros(logits.shape[0], dtype=torch.long))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class KeyQueue(nn.Module):
    """A ring buffer of l2-normalised keys (buffers, so checkpoints hold it).

    Args:
        size: K, the number of negatives.
        dim: Key size.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"method.queue_size must be >= 1, got {size}")
        # Random unit vectors until real keys replace them, as in MoCo.
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Writes the (B, D) keys of this rank and of every other rank, in rank order."""
        keys = gather_no_grad(F.normalize(keys.detach().float(), dim=1))
        n = keys.shape[0]
        if n > self.size:
            raise ValueError(f"method.queue_size={self.size} is smaller than the global batch {n}")
        # Modular indices: no host-device synchronisation on the pointer.
        index = (self.ptr + torch.arange(n, device=keys.device)) % self.size
        self.keys.index_copy_(0, index, keys.to(self.keys.dtype))
        self.ptr.copy_((self.ptr + n) % self.size)


@torch.no_grad()
def batch_shuffle(x: Tensor) -> tuple[Tensor, Tensor | None]:
    """Shuffling BN: this rank's share of a random permutation of the global batch.

    The key encoder's BatchNorm then sees other images than the query's, so the model cannot
    match a query to its key through batch statistics. A no-op on one process.

    Returns:
        ``(x_shuffled, unshuffle)``, with ``unshuffle`` for :func:`batch_unshuffle`.
    """
    if not _distributed():
        return x, None
    gathered = gather_no_grad(x)
    perm = torch.randperm(gathered.shape[0], device=x.device)
    dist.broadcast(perm, src=0)
    rank, batch = dist.get_rank(), x.shape[0]
    return gathered[perm[rank * batch : (rank + 1) * batch]], torch.argsort(perm)


@torch.no_grad()
def batch_unshuffle(x: Tensor, unshuffle: Tensor | None) -> Tensor:
    """The outputs of :func:`batch_shuffle`'d inputs, back in this rank's original order."""
    if unshuffle is None:
        return x
    gathered = gather_no_grad(x)
    rank, batch = dist.get_rank(), x.shape[0]
    return gathered[unshuffle[rank * batch : (rank + 1) * batch]]
