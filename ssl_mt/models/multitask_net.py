"""The multi-task network: one timm encoder, a segmentation decoder, classification heads.

The encoder is segmentation_models_pytorch's ``tu-<timm name>`` encoder, so any timm model
with 5 feature levels works; the decoder is any smp architecture (U-Net by default) with one
output channel per segmentation task; each classification task gets a head on the pooled
deepest feature map.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
from torch import Tensor, nn

from ssl_mt.models.backbone import (
    BackboneError,
    check_model_name,
    load_weights_file,
    match_state_dict,
)
from ssl_mt.models.heads import ClassificationHead
from ssl_mt.tasks import TaskSpec

log = logging.getLogger(__name__)

_FLATTENED = re.compile(r"^([A-Za-z]+(?:_[A-Za-z]+)*)_(\d+)(\..*)?$")


def timm_key(features_key: str) -> str:
    """The plain timm key of a ``features_only`` key (``stages_0.x`` → ``stages.0.x``)."""
    head, _, rest = features_key.partition(".")
    match = _FLATTENED.match(head)
    if not match:
        return features_key
    return f"{match.group(1)}.{match.group(2)}" + (f".{rest}" if rest else "")


class MultiTaskNet(nn.Module):
    """Shared encoder + segmentation decoder + classification heads.

    Args:
        backbone: timm model name.
        tasks: The tasks; segmentation tasks share the decoder (one channel each).
        arch: segmentation_models_pytorch architecture (``unet``, ``fpn``, ...).
        decoder_channels: U-Net decoder widths (U-Net family only).
        pretrained: Start the encoder from timm's hub weights (needs network access).
        head_dropout: Dropout before each classification layer.
        drop_path_rate: Stochastic depth of the encoder.
        **timm_kwargs: Further arguments of the timm model (a misspelt one fails in timm,
            naming it).
    """

    def __init__(
        self,
        backbone: str,
        tasks: Sequence[TaskSpec],
        arch: str = "unet",
        decoder_channels: Sequence[int] | None = None,
        pretrained: bool = False,
        head_dropout: float = 0.2,
        drop_path_rate: float = 0.0,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        check_model_name(backbone)
        self.backbone_name = backbone
        self.seg_tasks = [t.name for t in tasks if t.is_segmentation]
        self.cls_tasks = [t for t in tasks if not t.is_segmentation]
        kwargs = dict(timm_kwargs)
        if decoder_channels is not None and arch.lower() in ("unet", "unetplusplus"):
            kwargs["decoder_channels"] = list(decoder_channels)
        if drop_path_rate:
            kwargs["drop_path_rate"] = drop_path_rate
        net = smp.create_model(
            arch,
            encoder_name=f"tu-{backbone}",
            encoder_weights="imagenet" if pretrained else None,
            classes=max(1, len(self.seg_tasks)),
            **kwargs,
        )
        self.encoder = net.encoder
        self.decoder = net.decoder if self.seg_tasks else None
        self.segmentation_head = net.segmentation_head if self.seg_tasks else None
        deepest = self.encoder.out_channels[-1]
        self.heads = nn.ModuleDict(
            {
                t.name: ClassificationHead(deepest, t.num_classes, head_dropout)
                for t in self.cls_tasks
            }
        )

    @property
    def timm_encoder(self) -> nn.Module:
        """The timm ``features_only`` model inside the smp encoder."""
        return self.encoder.model

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """(N, 3, H, W) → per task: (N, 1, H, W) mask logits or (N, C) class logits."""
        features = self.encoder(images)
        out: dict[str, Tensor] = {}
        if self.decoder is not None:
            masks = self.segmentation_head(self.decoder(features))
            for k, name in enumerate(self.seg_tasks):
                out[name] = masks[:, k : k + 1]
        for name, head in self.heads.items():
            out[name] = head(features[-1])
        return out

    def load_encoder_weights(self, path: str | Path) -> tuple[int, list[str]]:
        """Loads an exported backbone (plain timm state dict) into the encoder.

        Every tensor the encoder needs must be in the file with the right shape; tensors the
        ``features_only`` encoder does not have (e.g. EfficientNet's ``conv_head``) are
        ignored and returned.

        Returns:
            (number of encoder tensors loaded, names of file tensors not used).

        Raises:
            BackboneError: listing the missing or mismatched keys.
        """
        return self.load_encoder_state(load_weights_file(path), str(path))

    def load_encoder_state(self, state: Mapping[str, Tensor], source: str) -> tuple[int, list[str]]:
        """:meth:`load_encoder_weights` from tensors in memory; ``source`` names them."""
        path = source
        encoder = self.timm_encoder
        renamed = {k: state[timm_key(k)] for k in encoder.state_dict() if timm_key(k) in state}
        subset = match_state_dict(encoder, renamed, str(path))
        encoder.load_state_dict(subset, strict=True)
        used = {timm_key(k) for k in subset}
        unused = sorted(k for k in state if k not in used)
        log.info(
            "loaded %d/%d encoder tensors from %s (%d file tensors unused by the encoder: %s)",
            len(subset),
            len(encoder.state_dict()),
            path,
            len(unused),
            ", ".join(unused[:6]) + (" ..." if len(unused) > 6 else ""),
        )
        return len(subset), unused

    def encoder_state_for_timm(self) -> dict[str, Tensor]:
        """The encoder's tensors under plain timm names (for exporting a fine-tuned encoder)."""
        return {timm_key(k): v for k, v in self.timm_encoder.state_dict().items()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        encoder = self.timm_encoder
        if not hasattr(encoder, "set_grad_checkpointing"):
            raise BackboneError(
                f"{self.backbone_name}: this timm encoder has no activation checkpointing"
            )
        encoder.set_grad_checkpointing(enable)
