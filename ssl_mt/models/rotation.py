"""RotNet: predict by how much each image was rotated (0°, 90°, 180°, 270°).

- [0] Gidaris, Singh, Komodakis, Unsupervised Representation Learning by Predicting Image
  Rotations, ICLR 2018, https://arxiv.org/abs/1803.07728

All four rotations of every image go into the same batch (the paper found this better than
one random rotation per image), so a batch of B images trains on 4B.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_mt.data.transforms import ViewSpec
from ssl_mt.models.ssl_base import SSLModule
from ssl_mt.models.task_metrics import step_mean

NUM_ROTATIONS = 4


def rotate_batch(images: Tensor) -> tuple[Tensor, Tensor]:
    """The four rotations of every image and their labels.

    Args:
        images: (B, C, H, W) with H == W.

    Returns:
        ``(rotated, labels)``: (4B, C, H, W), block k holding the images rotated by k × 90°
        counter-clockwise (``torch.rot90(x, k, dims=(2, 3))``), and (4B,) labels k.
    """
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"rotation needs square (B, C, H, H) images, got {tuple(images.shape)}")
    rotated = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(NUM_ROTATIONS)])
    labels = torch.arange(NUM_ROTATIONS, device=images.device).repeat_interleave(images.shape[0])
    return rotated, labels


class RotationModule(SSLModule):
    """Rotation-prediction pretraining of a timm backbone (a linear 4-way classifier head).

    Args:
        views: One view per image (``{global_crops: 1}``); the rotations are made here.
        **kwargs: See :class:`ssl_mt.models.ssl_base.SSLModule`.
    """

    def __init__(self, views: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        spec = ViewSpec.from_config(views if views is not None else {"global_crops": 1})
        if spec.count != 1:
            raise ValueError(
                f"method.views must declare 1 view for rotation (global_crops: 1, "
                f"local_crops: 0), got {spec.global_crops} global + {spec.local_crops} local"
            )
        self.classifier = nn.Linear(self.backbone.num_features, NUM_ROTATIONS)
        self._extra_metrics = nn.ModuleDict({"rotation_top1": step_mean()})

    def head_modules(self) -> list[nn.Module]:
        return [self.classifier]

    def ssl_step(self, views: Sequence[Tensor]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        if len(views) != 1:
            raise ValueError(f"rotation takes 1 view per image, got {len(views)}")
        images, labels = rotate_batch(views[0])
        features = self.features(images)
        logits = self.classifier(features)
        loss = F.cross_entropy(logits, labels)
        with torch.no_grad():
            top1 = (logits.argmax(dim=1) == labels).float().mean()
        return loss, features, {"rotation_top1": top1}
