"""SimCLR: two views, a projection MLP and NT-Xent with negatives from all ranks.

- [0] SimCLR, 2020, https://arxiv.org/abs/2002.05709
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_mt.losses.nt_xent import NTXentLoss, nt_xent_logits
from ssl_mt.models.heads import ProjectionHead
from ssl_mt.models.ssl_base import SSLModule
from ssl_mt.models.task_metrics import step_mean


class SimCLRModule(SSLModule):
    """SimCLR pretraining of a timm backbone.

    Args:
        projection: ``hidden_dim`` (1024), ``out_dim`` (128), ``num_layers`` (2),
            ``last_bn`` (True).
        temperature: NT-Xent temperature (> 0).
        **kwargs: See :class:`SSLModule`.
    """

    def __init__(
        self,
        projection: Mapping[str, Any],
        temperature: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.criterion = NTXentLoss(temperature)  # validates the temperature
        self.projector = ProjectionHead(self.backbone.num_features, **dict(projection))
        self._extra_metrics = nn.ModuleDict({"contrastive_top1": step_mean()})

    def head_modules(self) -> list[nn.Module]:
        return [self.projector]

    def ssl_step(self, views: Sequence[Tensor]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        if len(views) != 2:
            raise ValueError(f"SimCLR takes 2 views per image, got {len(views)}")
        batch = views[0].shape[0]
        # One forward over both views: BatchNorm statistics cover 2B images.
        z = self.projector(self.features(torch.cat(list(views))))
        logits, targets = nt_xent_logits(z[:batch], z[batch:], self.criterion.temperature)
        loss = F.cross_entropy(logits, targets)
        with torch.no_grad():
            top1 = (logits.argmax(dim=1) == targets).float().mean()
        return loss, z, {"contrastive_top1": top1}
