"""Random patch masks of masked image modelling, and what fills the masked patches.

A mask depends only on (run seed, epoch, sample index), like the sample's augmentation
(:func:`ssl_mt.data.datasets.sample_seed`), so a run draws the same masks whatever the
number of workers or devices, and a resumed run the masks it would have drawn.

Fills (``method.fill``):

- ``mean``: the mean colour of the image's visible pixels (A2MIM, https://arxiv.org/abs/2205.13943,
  fills with the image's mean RGB; the visible pixels' mean here, so that nothing of the
  masked pixels reaches the encoder);
- ``token``: a learnable colour (SimMIM's learnable mask token, https://arxiv.org/abs/2111.09886,
  moved to the input: a CNN has no patch tokens to replace);
- ``other``: the same patch of the next image in the batch (a cut-and-paste fill, one of
  the alternatives A2MIM compares).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ssl_mt.data.datasets import sample_seed

FILLS = ("mean", "token", "other")
# Separates the mask stream from the augmentation's (seeded with sample_seed + view offset).
_MASK_STREAM = 0x4D494D00


def masked_count(num_patches: int, ratio: float) -> int:
    """Patches masked per image: ``round(ratio × num_patches)``, at least 1, at most all but 1."""
    if num_patches < 2:
        raise ValueError(
            f"an image of {num_patches} patch cannot be masked and still show something: "
            "lower method.patch_size or raise the stage size"
        )
    return min(num_patches - 1, max(1, round(ratio * num_patches)))


def patch_masks(
    indices: Sequence[int] | Tensor,
    epoch: int,
    seed: int,
    grid: tuple[int, int],
    ratio: float,
) -> Tensor:
    """A random set of ``masked_count`` patches per sample, drawn from (seed, epoch, index).

    Args:
        indices: Dataset indices of the batch's samples.
        epoch: Training epoch.
        seed: Run seed.
        grid: Patches per column and per row ``(H / p, W / p)``.
        ratio: Fraction of patches to mask.

    Returns:
        (B, gh, gw) bool, True where masked; every sample has the same number masked.
    """
    gh, gw = grid
    n = gh * gw
    k = masked_count(n, ratio)
    rows = []
    for index in torch.as_tensor(indices).tolist():
        generator = torch.Generator().manual_seed(
            sample_seed(seed, epoch, int(index)) ^ _MASK_STREAM
        )
        chosen = torch.randperm(n, generator=generator)[:k]
        rows.append(torch.zeros(n, dtype=torch.bool).index_fill_(0, chosen, True))
    return torch.stack(rows).view(-1, gh, gw)


def pixel_mask(masks: Tensor, patch_size: int) -> Tensor:
    """(B, gh, gw) patch masks → (B, 1, gh·p, gw·p) pixel masks."""
    up = masks.repeat_interleave(patch_size, dim=1).repeat_interleave(patch_size, dim=2)
    return up.unsqueeze(1)


class MaskFill(nn.Module):
    """Replaces the masked pixels of a batch by the configured fill.

    Args:
        fill: ``mean``, ``token`` or ``other`` (see the module docstring).
        channels: Image channels (the token's size).
    """

    def __init__(self, fill: str = "mean", channels: int = 3) -> None:
        super().__init__()
        if fill not in FILLS:
            raise ValueError(f"method.fill must be one of {FILLS}, got {fill!r}")
        self.fill = fill
        # In the normalised input space: 0 is the dataset's mean colour.
        self.token = nn.Parameter(torch.zeros(channels)) if fill == "token" else None

    def forward(self, images: Tensor, mask: Tensor) -> Tensor:
        """``images`` (B, C, H, W) with the pixels where ``mask`` (B, 1, H, W) is True filled."""
        mask = mask.to(torch.bool)
        if self.fill == "mean":
            visible = (~mask).to(images.dtype)
            total = (images * visible).sum(dim=(2, 3), keepdim=True)
            value = total / visible.sum(dim=(2, 3), keepdim=True).clamp(min=1.0)
        elif self.fill == "token":
            value = self.token.to(images.dtype).view(1, -1, 1, 1)
        else:
            if images.shape[0] < 2:
                raise ValueError("method.fill=other needs at least 2 images per batch")
            value = images.roll(1, dims=0)
        return torch.where(mask, value.expand_as(images), images)
