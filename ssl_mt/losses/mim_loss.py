"""Reconstruction loss of masked image modelling: masked patches only, global mean under DDP.

- [0] MAE, He et al. 2021, https://arxiv.org/abs/2111.06377 (``norm_pix_loss``: every target
  patch normalised by its own mean and variance; the loss on masked patches only)
- [1] SimMIM, Xie et al. 2021, https://arxiv.org/abs/2111.09886 (L1 on the masked pixels)

The loss is the mean error over every masked pixel value (pixel × channel) of the GLOBAL
batch: each rank sums its errors and divides by the all-reduced count of masked values, times
the world size, so that DDP's gradient averaging yields exactly the gradient of one process
on the whole batch. Every rank makes the same single collective per step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ssl_mt.losses.precision import autocast_off

LOSS_KINDS = ("l1", "l2")


def _world() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def normalize_patches(images: Tensor, patch_size: int, eps: float = 1e-6) -> Tensor:
    """Every ``patch_size`` × ``patch_size`` patch normalised by its own mean and variance.

    As MAE's ``norm_pix_loss``: statistics over the patch's pixels and channels together,
    unbiased variance, ``(x − mean) / sqrt(var + eps)``.

    Args:
        images: (B, C, H, W) with H and W multiples of ``patch_size``.

    Returns:
        (B, C, H, W) normalised targets.
    """
    b, c, h, w = images.shape
    if h % patch_size or w % patch_size:
        raise ValueError(
            f"image {h}×{w} px is not a whole number of {patch_size} px patches "
            "(method.patch_size must divide every stage size)"
        )
    gh, gw = h // patch_size, w // patch_size
    patches = images.reshape(b, c, gh, patch_size, gw, patch_size)
    mean = patches.mean(dim=(1, 3, 5), keepdim=True)
    var = patches.var(dim=(1, 3, 5), keepdim=True)
    return ((patches - mean) / (var + eps).sqrt()).reshape(b, c, h, w)


def masked_reconstruction_loss(
    prediction: Tensor,
    target: Tensor,
    pixel_mask: Tensor,
    kind: str = "l2",
) -> Tensor:
    """Mean L1 or L2 error over the masked pixel values of the global batch.

    Pixels outside the mask contribute nothing, not even through NaN or Inf (they are
    selected away, not multiplied by zero).

    Args:
        prediction: (B, C, H, W) decoder output.
        target: (B, C, H, W) targets (e.g. :func:`normalize_patches` of the images).
        pixel_mask: (B, 1, H, W) bool, True where the input was masked.
        kind: ``l1`` (absolute error) or ``l2`` (squared error).

    Returns:
        A scalar. On one rank of a DDP group, ``world × local sum / global count``: with
        DDP's gradient averaging the gradient is that of the global mean.
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"method.loss must be one of {LOSS_KINDS}, got {kind!r}")
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ"
        )
    mask = pixel_mask.to(torch.bool).expand_as(target)
    with autocast_off(prediction):  # float32 errors and sum, also under autocast
        # Select before subtracting: the error (and its gradient) outside the mask is 0.
        zero = prediction.new_zeros((), dtype=torch.float32)
        diff = torch.where(mask, prediction.float(), zero) - torch.where(mask, target.float(), zero)
        error = diff.abs() if kind == "l1" else diff.square()
        total = error.sum()
        count = mask.sum().to(total.dtype)
    world = _world()
    if world > 1:
        count = count.detach().clone()
        dist.all_reduce(count)  # every rank, every step: the same collective
    return total * world / count.clamp(min=1.0)
