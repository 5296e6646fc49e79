"""Masked image modelling for CNN backbones: hide patches of the input, reconstruct them.

- [0] MAE, He et al. 2021, https://arxiv.org/abs/2111.06377
- [1] SimMIM, Xie et al. 2021, https://arxiv.org/abs/2111.09886
- [2] SparK, Tian et al. ICLR 2023, https://arxiv.org/abs/2301.03580
- [3] A2MIM, Li et al. ICML 2023, https://arxiv.org/abs/2205.13943

What is followed: random patch masking of the input at a ratio of 0.6 with patches that are
a multiple of the encoder's output stride, so every masked patch covers whole cells of the
deepest feature map ([1], [2]); masked patches filled with the image's mean colour ([3]),
a learnable token ([1]) or another image's patch; the unmodified timm backbone as encoder
(``forward_features``); a light decoder of upsampling blocks from the deepest feature map
back to pixels ([2]'s light decoder, without its skip connections), or with no block
SimMIM's one-layer linear head ([1]); L1 ([1]) or L2 ([0]) on per-patch normalised pixels
([0]) of the masked patches only.

Where it deviates: the encoder is dense, not sparse ([2] runs sparse convolutions so that
masked regions stay empty through the network); the mask token is a colour at the input,
not an embedding inside the network ([1] replaces patch tokens, [3] adds its token to an
intermediate stage); [3]'s Fourier-domain loss is not used; the decoder sees only the
deepest feature map, not [2]'s hierarchy. Dense convolutions see across mask borders and
the statistics of masked regions leak into BatchNorm, which is why [2] and [3] exist: see
the README for what this means in practice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from ssl_mt.data.transforms import ViewSpec
from ssl_mt.losses.mim_loss import LOSS_KINDS, masked_reconstruction_loss, normalize_patches
from ssl_mt.models.masking import MaskFill, masked_count, patch_masks, pixel_mask
from ssl_mt.models.ssl_base import SSLModule, to_channels_last


def output_stride(backbone: nn.Module) -> int:
    """The reduction of the deepest feature map ``forward_features`` returns."""
    info = getattr(backbone, "feature_info", None)
    last = info[-1] if isinstance(info, Sequence) and info else None
    if isinstance(last, Mapping) and "reduction" in last:
        return int(last["reduction"])
    size = 224
    with torch.no_grad():
        was_training = backbone.training
        backbone.eval()
        fmap = backbone.forward_features(torch.zeros(1, 3, size, size))
        backbone.train(was_training)
    return size // int(fmap.shape[-1])


def _upsampling_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """×2: transposed convolution, then a 3×3 convolution, each with BatchNorm and ReLU."""
    return nn.Sequential(
        nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class PixelDecoder(nn.Module):
    """Feature map at stride ``s`` → pixels: upsampling blocks, then a linear pixel shuffle.

    Each entry of ``channels`` is one ×2 upsampling block of that width; a 1×1 convolution and
    a pixel shuffle make up the remaining factor ``s / 2^len(channels)``. ``channels=[]`` is
    SimMIM's one-layer head.

    Args:
        in_channels: Channels of the encoder's feature map.
        stride: The encoder's output stride.
        channels: Widths of the upsampling blocks.
        out_channels: Image channels.
    """

    def __init__(
        self, in_channels: int, stride: int, channels: Sequence[int], out_channels: int = 3
    ) -> None:
        super().__init__()
        blocks = []
        width, factor = in_channels, stride
        for out in channels:
            if factor % 2:
                raise ValueError(
                    f"method.decoder.channels={list(channels)}: {len(channels)} ×2 upsampling "
                    f"blocks exceed the backbone's output stride {stride}"
                )
            blocks.append(_upsampling_block(width, int(out)))
            width, factor = int(out), factor // 2
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Conv2d(width, out_channels * factor * factor, kernel_size=1), nn.PixelShuffle(factor)
        )

    def forward(self, features: Tensor) -> Tensor:
        return self.head(self.blocks(features))


class MIMModule(SSLModule):
    """Masked-image-modelling pretraining of a timm CNN backbone.

    Args:
        patch_size: Side of a masked patch in pixels; a multiple of the backbone's output
            stride; every stage size must be a multiple of it.
        mask_ratio: Fraction of the patches masked in every image, in (0, 1).
        fill: What replaces masked pixels: ``mean`` | ``token`` | ``other``
            (:class:`ssl_mt.models.masking.MaskFill`).
        loss: ``l1`` or ``l2``.
        norm_pix: Targets normalised per patch (MAE's ``norm_pix_loss``); raw pixels when False.
        decoder: ``channels``: widths of the decoder's ×2 upsampling blocks.
        views: One view per image (``{global_crops: 1}``).
        seed: The run seed; masks depend on (seed, epoch, sample index).
        reconstructions: The per-epoch picture: ``num_samples``, ``every_n_epochs``
            (0 turns it off).
        **kwargs: See :class:`ssl_mt.models.ssl_base.SSLModule`.
    """

    def __init__(
        self,
        patch_size: int = 32,
        mask_ratio: float = 0.6,
        fill: str = "mean",
        loss: str = "l2",
        norm_pix: bool = True,
        decoder: Mapping[str, Any] | None = None,
        views: Mapping[str, Any] | None = None,
        seed: int = 0,
        reconstructions: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        spec = ViewSpec.from_config(views if views is not None else {"global_crops": 1})
        if spec.count != 1:
            raise ValueError(
                f"method.views must declare 1 view for MIM (global_crops: 1, local_crops: 0), "
                f"got {spec.global_crops} global + {spec.local_crops} local"
            )
        self.stride = output_stride(self.backbone)
        name = self.backbone_cfg.get("name")
        if patch_size < self.stride or patch_size % self.stride:
            raise ValueError(
                f"method.patch_size={patch_size} must be a multiple of the output stride "
                f"{self.stride} of backbone {name!r}, so that every masked patch covers whole "
                f"cells of its deepest feature map (e.g. {self.stride} or {2 * self.stride})"
            )
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"method.mask_ratio must be in (0, 1), got {mask_ratio}")
        if loss not in LOSS_KINDS:
            raise ValueError(f"method.loss must be one of {LOSS_KINDS}, got {loss!r}")
        self.patch_size = int(patch_size)
        self.mask_ratio = float(mask_ratio)
        self.loss_kind = loss
        self.norm_pix = bool(norm_pix)
        self.seed = int(seed)
        self.reconstructions_cfg = dict(reconstructions or {})
        unknown = sorted(set(self.reconstructions_cfg) - {"num_samples", "every_n_epochs"})
        if unknown:
            raise ValueError(
                f"method.reconstructions: unknown key(s) {unknown}; "
                "known: ['every_n_epochs', 'num_samples']"
            )
        self.mask_fill = MaskFill(fill)
        decoder = dict(decoder or {})
        unknown = sorted(set(decoder) - {"channels"})
        if unknown:
            raise ValueError(f"method.decoder: unknown key(s) {unknown}; known: ['channels']")
        channels = decoder.get("channels", [128, 64, 32])
        self.decoder = PixelDecoder(self.backbone.num_features, self.stride, channels)
        self._compiled_features: Any = None
        self._batch_index: Tensor | None = None

    def head_modules(self) -> list[nn.Module]:
        return [self.decoder, self.mask_fill]

    def configure_model(self) -> None:
        super().configure_model()
        if self.compile_backbone:
            # forward_features, not forward, is what this method calls.
            self._compiled_features = torch.compile(self.backbone.forward_features, dynamic=False)

    def feature_map(self, images: Tensor) -> Tensor:
        """The backbone's deepest feature map (B, C, H / stride, W / stride)."""
        encode = self._compiled_features or self.backbone.forward_features
        return encode(to_channels_last(images, self.channels_last))

    def configure_callbacks(self) -> list[L.Callback]:
        from ssl_mt.callbacks.reconstructions import ReconstructionGrid

        if int(self.reconstructions_cfg.get("every_n_epochs", 1)) <= 0:
            return []
        return [ReconstructionGrid(**self.reconstructions_cfg)]

    def setup(self, stage: str) -> None:
        schedule = getattr(getattr(self.trainer, "datamodule", None), "schedule", None)
        if schedule is None:
            return
        for i, s in enumerate(schedule.stages):
            self.check_size(s.size, f"schedule.stages[{i}].size")

    def check_size(self, size: int, key: str) -> None:
        """Raises unless ``size`` is a whole number (at least 2) of patches."""
        if size % self.patch_size or size < 2 * self.patch_size:
            raise ValueError(
                f"{key}={size} must be a multiple of method.patch_size={self.patch_size} "
                f"and hold at least 2 patches (e.g. {max(2, size // self.patch_size)} × "
                f"{self.patch_size} = {max(2, size // self.patch_size) * self.patch_size})"
            )
        masked_count((size // self.patch_size) ** 2, self.mask_ratio)

    # -- masking and reconstruction -----------------------------------------------------
    def masks(self, index: Tensor, epoch: int, height: int, width: int) -> Tensor:
        """(B, 1, H, W) bool pixel masks of the samples ``index`` at ``epoch``."""
        for side, what in ((height, "height"), (width, "width")):
            if side % self.patch_size:
                raise ValueError(
                    f"image {what} {side} px is not a multiple of method.patch_size="
                    f"{self.patch_size}"
                )
        grid = (height // self.patch_size, width // self.patch_size)
        patches = patch_masks(index.cpu(), epoch, self.seed, grid, self.mask_ratio)
        return pixel_mask(patches, self.patch_size)

    def reconstruct(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Masks, encodes and decodes ``images``.

        Returns:
            ``(masked_input, prediction, feature_map)``: the filled input (B, 3, H, W), the
            decoder's output (B, 3, H, W; per-patch normalised pixels when ``norm_pix``) and
            the encoder's feature map.
        """
        masked = self.mask_fill(images, mask)
        fmap = self.feature_map(masked)
        prediction = self.decoder(fmap)
        if prediction.shape[-2:] != images.shape[-2:]:
            raise ValueError(
                f"decoder output {tuple(prediction.shape[-2:])} != image "
                f"{tuple(images.shape[-2:])}: image sizes must be multiples of "
                f"method.patch_size={self.patch_size}"
            )
        return masked, prediction, fmap

    def targets(self, images: Tensor) -> Tensor:
        if self.norm_pix:
            return normalize_patches(images.float(), self.patch_size)
        return images.float()

    def mim_loss(self, images: Tensor, index: Tensor, epoch: int) -> tuple[Tensor, Tensor]:
        """The reconstruction loss of one batch and the pooled features of its masked input."""
        mask = self.masks(index, epoch, images.shape[-2], images.shape[-1]).to(images.device)
        _, prediction, fmap = self.reconstruct(images, mask)
        loss = masked_reconstruction_loss(prediction, self.targets(images), mask, self.loss_kind)
        return loss, self.backbone.forward_head(fmap)

    # -- the SSLModule contract -----------------------------------------------------------
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        # The masks need the samples' dataset indices, which ssl_step's views do not carry.
        self._batch_index = batch["index"]
        try:
            return super().training_step(batch, batch_idx)
        finally:
            self._batch_index = None

    def ssl_step(self, views: Sequence[Tensor]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        if len(views) != 1:
            raise ValueError(f"MIM takes 1 view per image, got {len(views)}")
        if self._batch_index is None:
            raise ValueError(
                "MIM draws each sample's mask from its dataset index: call training_step with "
                "the batch (its 'index'), or mim_loss(images, index, epoch)"
            )
        loss, pooled = self.mim_loss(views[0], self._batch_index, self.current_epoch)
        return loss, pooled, {}
