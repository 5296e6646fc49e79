"""DINO: self-distillation of a student from its EMA teacher, multi-crop, centring, sharpening.

- [0] DINO, 2021, https://arxiv.org/abs/2104.14294

The teacher (EMA of the student, :mod:`ssl_mt.models.ema`) sees the 2 global views; the
student sees the global and the local views (multi-crop, declared in ``method.views`` and
built by the SSL datamodule). The loss is :class:`ssl_mt.losses.dino_loss.DINOLoss`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_mt.data.transforms import ViewSpec
from ssl_mt.losses.dino_loss import DINOLoss
from ssl_mt.models.ema import MomentumSSLModule, momentum_copy
from ssl_mt.models.ssl_base import to_channels_last
from ssl_mt.models.task_metrics import step_mean


class DINOHead(nn.Module):
    """MLP → bottleneck → l2-normalisation → weight-normalised linear layer to K outputs.

    Args:
        in_dim: Backbone feature size.
        out_dim: K (65536).
        hidden_dim: MLP width (2048).
        bottleneck_dim: Size before the last layer (256).
        num_layers: Linear layers of the MLP (3).
        use_bn: BatchNorm after the hidden layers (False).
        norm_last_layer: Fix the last layer's weight norm to 1 (True; more stable).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"method.head.num_layers must be >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(dim, hidden_dim)]
            layers += [nn.BatchNorm1d(hidden_dim)] if use_bn else []
            layers += [nn.GELU()]
            dim = hidden_dim
        layers.append(nn.Linear(dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        # Weight normalisation W = g · v / ‖v‖ per output row, g fixed to 1 by default.
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.last_scale = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(N, in_dim) → logits (N, K) and bottleneck features (N, bottleneck_dim)."""
        h = self.mlp(x)
        weight = self.last_scale * F.normalize(self.last_layer.weight, dim=1)
        return F.linear(F.normalize(h, dim=-1), weight), h


class DINOModule(MomentumSSLModule):
    """DINO pretraining of a timm backbone.

    Args:
        head: :class:`DINOHead` arguments.
        views: Multi-crop (:class:`ssl_mt.data.transforms.ViewSpec`): exactly 2 global
            crops (the teacher's views), at least 1 local crop.
        student_temperature: τ_s (0.1).
        teacher_temperature: τ_t after warmup (0.04).
        warmup_teacher_temperature: τ_t at epoch 0 (0.04).
        warmup_teacher_temperature_epochs: Linear τ_t warmup length in epochs (0).
        center_momentum: EMA momentum of the teacher centre (0.9).
        freeze_last_layer_epochs: The head's last layer gets no update during these first
            epochs (1).
        momentum: Teacher EMA (:class:`ssl_mt.models.ema.MomentumSchedule`; 0.996 → 1).
        **kwargs: See :class:`ssl_mt.models.ssl_base.SSLModule`.
    """

    def __init__(
        self,
        head: Mapping[str, Any],
        views: Mapping[str, Any],
        student_temperature: float = 0.1,
        teacher_temperature: float = 0.04,
        warmup_teacher_temperature: float = 0.04,
        warmup_teacher_temperature_epochs: int = 0,
        center_momentum: float = 0.9,
        freeze_last_layer_epochs: int = 1,
        momentum: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(momentum=momentum or {"base": 0.996, "final": 1.0}, **kwargs)
        self.save_hyperparameters()
        self.views = ViewSpec.from_config(views)
        if self.views.global_crops != 2:
            raise ValueError(
                f"method.views.global_crops must be 2 for DINO (the teacher's two global "
                f"views), got {self.views.global_crops}"
            )
        if self.views.local_crops < 1:
            raise ValueError(
                f"method.views.local_crops must be >= 1 for DINO (multi-crop), "
                f"got {self.views.local_crops}"
            )
        for name, value in (
            ("teacher_temperature", teacher_temperature),
            ("warmup_teacher_temperature", warmup_teacher_temperature),
        ):
            if value <= 0:
                raise ValueError(f"method.{name} must be > 0, got {value}")
        self.teacher_temperature = teacher_temperature
        self.warmup_teacher_temperature = warmup_teacher_temperature
        self.warmup_teacher_temperature_epochs = warmup_teacher_temperature_epochs
        self.freeze_last_layer_epochs = freeze_last_layer_epochs
        self.head = DINOHead(self.backbone.num_features, **dict(head))
        self.target = nn.ModuleDict(
            {"backbone": momentum_copy(self.backbone), "head": momentum_copy(self.head)}
        )
        self.criterion = DINOLoss(
            self.head.last_layer.out_features, student_temperature, center_momentum
        )
        self._extra_metrics = nn.ModuleDict({"teacher_entropy": step_mean()})

    def head_modules(self) -> list[nn.Module]:
        return [self.head]

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.target["backbone"]), (self.head, self.target["head"])]

    def teacher_temperature_at(self, epoch: int) -> float:
        """τ_t of an epoch: linear warmup (as ``np.linspace``), then constant."""
        warmup = self.warmup_teacher_temperature_epochs
        if epoch >= warmup:
            return self.teacher_temperature
        if warmup == 1:
            return self.warmup_teacher_temperature
        start, end = self.warmup_teacher_temperature, self.teacher_temperature
        return start + (end - start) * epoch / (warmup - 1)

    def ssl_step(self, views: Sequence[Tensor]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        if len(views) != self.views.count:
            raise ValueError(
                f"DINO expects {self.views.count} views per image (method.views), got {len(views)}"
            )
        global_views = torch.cat(list(views[:2]))
        local_views = torch.cat(list(views[2:]))
        with torch.no_grad():
            target = self.target
            features = target["backbone"](to_channels_last(global_views, self.channels_last))
            teacher, _ = target["head"](features)
        # One forward per resolution (BatchNorm statistics per crop size, as DINO does).
        student_global, embeddings = self.head(self.features(global_views))
        student_local, _ = self.head(self.features(local_views))
        student = [*student_global.chunk(2), *student_local.chunk(self.views.local_crops)]
        temperature = self.teacher_temperature_at(self.current_epoch)
        with torch.no_grad():
            pt = F.softmax((teacher.float() - self.criterion.center) / temperature, dim=-1)
            entropy = -(pt * pt.clamp_min(1e-12).log()).sum(dim=-1).mean()
        loss = self.criterion(student, teacher.chunk(2), temperature)
        return loss, embeddings, {"teacher_entropy": entropy}

    def on_after_backward(self) -> None:
        if self.current_epoch < self.freeze_last_layer_epochs:
            for param in self.head.last_layer.parameters():
                param.grad = None
