"""Task losses as means over the labeled samples of the WHOLE global batch.

With partial labels a per-rank mean is wrong under DDP: DDP averages the ranks' gradients,
so a task labeled once on rank 0 and 15 times on rank 1 gives the lone sample 15× the weight
of each other one, and a rank with no label of the task still divides the task's gradient by
the world size. Lightning's gradient accumulation does the same across micro-batches (it
divides every micro-batch's loss by ``accumulate_grad_batches``).

Here rank ``r`` contributes, for task ``t``, ``W·K·S_r / N`` where ``S_r`` is the sum of
its labeled samples' losses (each sample's loss from the task's ``per_sample``), ``W`` the
number of processes, ``K`` the accumulation and ``N`` the number of samples labeled for the
task over every rank (and every micro-batch of the optimiser step). DDP's 1/W and
Lightning's 1/K turn the gradient into that of ``ΣS / N``: exactly the gradient one process
gets from the masked mean over the concatenated batch.

The value of each task loss is the global one (``ΣS/N``, identical on every rank) while its
gradient is the rank's own (a straight-through sum), so a non-linear weighting (FAMO) sees
the true loss and every rank takes identical decisions on it (NaN checks, FAMO's logits).
The cost is ONE ``all_reduce`` of ``2·T`` floats per training step (plus one per rank: the
non-finite guard's flags ride along), made by every rank every step (a rank whose batch was
all bad runs it with an empty batch).

Gradient accumulation (``K > 1``): ``N`` must be known before the first micro-batch's
backward. It is counted from the manifest over the sampler's order (``window_counts``; no
image decoded), so the normalisation is exact for every task and every strategy whose loss
is linear in the task losses (fixed, uncertainty, DWA). Each micro-batch's value is then
``K·ΣS_k / N`` (its share of the step's mean, scaled so that the mean over the K micro-batches
is the step's loss). Not exact under accumulation: a sample skipped as bad still counts in
``N`` (the step's loss is then slightly below the mean over the decoded samples); FAMO is
non-linear in the losses and is refused with ``K > 1``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


@dataclass
class GlobalTaskLosses:
    """The per-task losses of one training (micro-)batch, reduced over every rank.

    Attributes:
        losses: 0-dim loss per task. Value: the global mean (``K·ΣS/N``), the same on every
            rank; gradient: the rank's share ``W·K·S_r/N`` (0 and still in the graph when the
            rank has no label of the task).
        present: 0-dim bool per task: labeled somewhere in the global step (``N > 0``).
        counts: ``N`` per task (float, the same on every rank).
        flags: The ``flags`` passed in, summed over the ranks (None when none were passed).
    """

    losses: dict[str, Tensor]
    present: dict[str, Tensor]
    counts: dict[str, Tensor]
    flags: Tensor | None = None


def global_task_losses(
    sums: Mapping[str, Tensor],
    counts: Mapping[str, Tensor] | Tensor,
    accumulate: int = 1,
    flags: Tensor | None = None,
) -> GlobalTaskLosses:
    """Global means of per-task loss sums; one ``all_reduce`` under DDP.

    Args:
        sums: Per task, the 0-dim sum of this rank's labeled per-sample losses (in the graph).
        counts: Per task (or a ``(T,)`` tensor in ``sums`` order), the number of samples this
            rank contributes to the normaliser: its labeled samples of the batch (``K = 1``)
            or of the whole accumulation window (``K > 1``).
        accumulate: Lightning's ``accumulate_grad_batches`` (``K``).
        flags: Further floats to sum over the ranks in the same ``all_reduce`` (the
            non-finite guard's per-rank flags, :func:`ssl_mt.models.nonfinite.rank_flags`).

    Returns:
        The losses, presence and global counts (see :class:`GlobalTaskLosses`).
    """
    names: Sequence[str] = list(sums)
    stacked = torch.stack([sums[name].float() for name in names])
    if isinstance(counts, Tensor):
        local_counts = counts.to(device=stacked.device, dtype=torch.float32).reshape(len(names))
    else:
        local_counts = torch.stack(
            [torch.as_tensor(counts[n], device=stacked.device).float() for n in names]
        )
    world = _world_size()
    extra = [] if flags is None else [flags.detach().to(stacked.device, torch.float32).flatten()]
    packed = torch.cat([stacked.detach(), local_counts, *extra])
    if world > 1:
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    global_sums, global_counts = packed[: len(names)], packed[len(names) : 2 * len(names)]
    global_flags = packed[2 * len(names) :] if flags is not None else None
    denominator = global_counts.clamp(min=1.0)
    share = stacked * (world * accumulate) / denominator
    value = global_sums * accumulate / denominator
    # Straight-through: the global value, the gradient of the rank's own share.
    losses = share + (value - share).detach()
    return GlobalTaskLosses(
        losses={name: losses[i] for i, name in enumerate(names)},
        present={name: global_counts[i] > 0 for i, name in enumerate(names)},
        counts={name: global_counts[i] for i, name in enumerate(names)},
        flags=global_flags,
    )


def labeled_sums(
    per_sample: Mapping[str, Tensor], present: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Per task: the sum of the labeled samples' losses (in the graph) and their count.

    ``torch.where``, not a product: an unlabeled sample's placeholder loss (even a
    non-finite one) contributes neither to the sum nor to the gradient.
    """
    sums, counts = {}, {}
    for name, values in per_sample.items():
        flags = present[name].to(device=values.device, dtype=torch.bool)
        sums[name] = torch.where(flags, values, torch.zeros_like(values)).sum()
        counts[name] = flags.sum()
    return sums, counts
