"""SimSiam: a siamese network with a predictor and a stop-gradient; no momentum encoder.

- [0] SimSiam, 2021, https://arxiv.org/abs/2011.10566
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ssl_mt.losses.byol_loss import simsiam_loss
from ssl_mt.models.byol import prediction_head
from ssl_mt.models.heads import ProjectionHead
from ssl_mt.models.ssl_base import SSLModule


class SimSiamModule(SSLModule):
    """SimSiam pretraining of a timm backbone.

    Args:
        projection: Projector MLP (:class:`ProjectionHead`: 3 layers of 2048, BN on the output).
        prediction: Predictor MLP (bottleneck ``hidden_dim`` 512, ``num_layers`` 2, no last BN).
        **kwargs: See :class:`ssl_mt.models.ssl_base.SSLModule`.
    """

    def __init__(
        self, projection: Mapping[str, Any], prediction: Mapping[str, Any], **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.projector = ProjectionHead(self.backbone.num_features, **dict(projection))
        out_dim = dict(projection).get("out_dim", 128)
        self.predictor = prediction_head(out_dim, prediction, "SimSiam")

    def head_modules(self) -> list[nn.Module]:
        return [self.projector, self.predictor]

    def ssl_step(self, views: Sequence[Tensor]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        if len(views) != 2:
            raise ValueError(f"SimSiam takes 2 views per image, got {len(views)}")
        z = self.projector(self.features(torch.cat(list(views))))
        p1, p2 = self.predictor(z).chunk(2)
        z1, z2 = z.chunk(2)
        # The stop-gradient on z is inside the loss (z.detach()).
        return simsiam_loss(p1, p2, z1, z2), z, {}
