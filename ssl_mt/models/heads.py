"""Small heads on top of backbone features."""

from __future__ import annotations

from torch import Tensor, nn


class ProjectionHead(nn.Module):
    """SimCLR's projection MLP: Linear → BatchNorm → ReLU, repeated, then Linear (→ BatchNorm).

    - [0] SimCLR, 2020, https://arxiv.org/abs/2002.05709 (v2 uses BatchNorm in every layer)

    Args:
        in_dim: Backbone feature size.
        hidden_dim: Hidden width (1024 in the reference setup).
        out_dim: Embedding size the contrastive loss sees.
        num_layers: Linear layers in total (>= 2).
        last_bn: BatchNorm (without affine) after the last layer, as in SimCLR v2.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 1024,
        out_dim: int = 128,
        num_layers: int = 2,
        last_bn: bool = True,
    ) -> None:
        super().__init__()
        if num_layers < 2:
            raise ValueError(f"projection num_layers must be >= 2, got {num_layers}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers += [
                nn.Linear(dim, hidden_dim, bias=False),
                nn.BatchNorm1d(hidden_dim),
                nn.ReLU(True),
            ]
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim, bias=not last_bn))
        if last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """(N, in_dim) → (N, out_dim)."""
        return self.net(x)


class ClassificationHead(nn.Module):
    """Global average pooling, dropout and a linear layer, on a (N, C, H, W) feature map."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, features: Tensor) -> Tensor:
        """(N, C, H, W) → (N, num_classes) logits."""
        return self.fc(self.dropout(self.pool(features).flatten(1)))
