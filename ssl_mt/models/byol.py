"""BYOL: an online network with a predictor regresses an EMA target network; no negatives.

- [0] BYOL, 2020, https://arxiv.org/abs/2006.07733
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ssl_mt.losses.byol_loss import byol_loss
from ssl_mt.models.ema import MomentumSSLModule, momentum_copy
from ssl_mt.models.heads import ProjectionHead
from ssl_mt.models.ssl_base import to_channels_last


def prediction_head(dim: int, prediction: Mapping[str, Any], method: str) -> ProjectionHead:
    """The predictor MLP, ``dim → hidden → dim`` (its output size is the projection's)."""
    prediction = dict(prediction)
    out_dim = prediction.pop("out_dim", dim)
    if out_dim != dim:
        raise ValueError(
            f"{method}: method.prediction.out_dim={out_dim} must equal "
            f"method.projection.out_dim={dim} (the predictor maps a projection onto another)"
        )
    return ProjectionHead(dim, out_dim=dim, **prediction)


class BYOLModule(MomentumSSLModule):
    """BYOL pretraining of a timm backbone.

    Args:
        projection: Projector MLP (:class:`ProjectionHead`: 4096 hidden, 256 out, no last BN).
        prediction: Predictor MLP (``hidden_dim`` 4096, ``num_layers`` 2, ``last_bn`` False).
        momentum: Target EMA (:class:`ssl_mt.models.ema.MomentumSchedule`; 0.996 → 1, cosine).
        **kwargs: See :class:`ssl_mt.models.ssl_base.SSLModule`.
    """

    def __init__(
        self,
        projection: Mapping[str, Any],
        prediction: Mapping[str, Any],
        momentum: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(momentum=momentum or {"base": 0.996, "final": 1.0}, **kwargs)
        self.save_hyperparameters()
        self.projector = ProjectionHead(self.backbone.num_features, **dict(projection))
        out_dim = dict(projection).get("out_dim", 128)
        self.predictor = prediction_head(out_dim, prediction, "BYOL")
        self.target = nn.ModuleDict(
            {"backbone": momentum_copy(self.backbone), "projector": momentum_copy(self.projector)}
        )

    def head_modules(self) -> list[nn.Module]:
        return [self.projector, self.predictor]

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [
            (self.backbone, self.target["backbone"]),
            (self.projector, self.target["projector"]),
        ]

    def ssl_step(self, views: Sequence[Tensor]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        if len(views) != 2:
            raise ValueError(f"BYOL takes 2 views per image, got {len(views)}")
        images = torch.cat(list(views))
        z = self.projector(self.features(images))
        p1, p2 = self.predictor(z).chunk(2)
        with torch.no_grad():
            target = self.target
            zt = target["projector"](
                target["backbone"](to_channels_last(images, self.channels_last))
            )
        zt1, zt2 = zt.chunk(2)
        return byol_loss(p1, p2, zt1, zt2), z, {}
