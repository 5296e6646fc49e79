"""SyncBatchNorm that keeps timm's fused norm + activation layers.

timm's EfficientNet (and every smp ``tu-`` encoder built on it) fuses the activation and
drop into its norm layer, :class:`timm.layers.BatchNormAct2d`. torch's
``SyncBatchNorm.convert_sync_batchnorm`` — what ``Trainer(sync_batchnorm=True)`` uses —
replaces that layer with a plain ``SyncBatchNorm`` and so silently drops the activation
(timm issue #1254): the network trained under DDP is not the one that was built.
:func:`timm.layers.convert_sync_batchnorm` converts it to ``SyncBatchNormAct``, which keeps
the activation and drop.

Lightning applies a layer-sync plugin when a DDP/FSDP strategy sets up for fitting and
reverts it at teardown. It refuses a custom plugin together with ``sync_batchnorm=True``
("Choose one or the other"), so :func:`ssl_mt.runner.build_trainer` turns the config's
``trainer.sync_batchnorm: true`` into this plugin and passes ``sync_batchnorm=False``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch.plugins import LayerSync
from timm.layers import convert_sync_batchnorm
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class TimmSyncBatchNorm(LayerSync):
    """Lightning layer sync with timm's converter; :meth:`revert` restores the original layers.

    Args:
        process_group: Synchronise within this group (None: the whole world).
    """

    def __init__(self, process_group: Any = None) -> None:
        self.process_group = process_group
        self._unsynced: dict[str, nn.Module] = {}

    def apply(self, model: nn.Module) -> nn.Module:
        """Converts every BatchNorm (``BatchNormAct2d`` to ``SyncBatchNormAct``) in ``model``.

        The converted layers share the originals' parameters and buffers, so the optimiser
        and the running statistics carry over.
        """
        # Remembered by name, so that revert gives back each layer's own class and settings
        # (timm's converter keeps neither: a BatchNorm1d and a BatchNorm2d both become
        # SyncBatchNorm).
        self._unsynced = {
            name: module
            for name, module in model.named_modules()
            if isinstance(module, _BatchNorm) and not isinstance(module, nn.SyncBatchNorm)
        }
        return convert_sync_batchnorm(model, process_group=self.process_group)

    def revert(self, model: nn.Module) -> nn.Module:
        """Puts the layers :meth:`apply` converted back, with the current parameters and buffers.

        A SyncBatchNorm this plugin did not create (built as such, or converted elsewhere) is
        left as it is.
        """
        unsynced, self._unsynced = self._unsynced, {}
        if "" in unsynced and isinstance(model, nn.SyncBatchNorm):
            return _restored(unsynced[""], model)
        for name, module in list(model.named_modules()):
            if name in unsynced and isinstance(module, nn.SyncBatchNorm):
                model.set_submodule(name, _restored(unsynced[name], module))
        return model


def _restored(original: nn.Module, synced: nn.Module) -> nn.Module:
    """``original`` (the unconverted layer) holding ``synced``'s current state.

    The parameters are the same objects (the optimiser's); the buffers and children are
    taken from ``synced`` because moving the model to a device replaced them there.
    """
    for name, param in synced.named_parameters(recurse=False):
        setattr(original, name, param)
    for name, buffer in synced.named_buffers(recurse=False):
        setattr(original, name, buffer)
    for name, child in synced.named_children():
        setattr(original, name, child)
    original.train(synced.training)
    return original


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the statistics ``torch.batch_norm_stats`` computes for ``dtype`` input:
    float32 for half and bfloat16 (the CUDA kernels accumulate in float32), else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@contextmanager
def empty_batch_statistics(model: nn.Module) -> Iterator[None]:
    """Within the block, an empty input reaches every SyncBatchNorm of ``model`` in the dtype
    of the statistics the other ranks send.

    A rank whose batch was all bad still runs the network (on no image), so that it makes
    every collective the other ranks make; SyncBatchNorm's empty-input path then sends zero
    statistics (count 0, filtered out by every rank). torch builds those zeros in the
    INPUT's dtype, while a non-empty rank sends ``batch_norm_stats`` in float32: under
    ``bf16-mixed`` the ranks would all-gather tensors of different byte sizes (forward) and
    all-reduce them (backward). Casting the empty input to float32 makes both the same; the
    output (empty) is cast back. A non-empty input is left as it is.

    The alternative, a dummy image with its loss zeroed, would enter the global batch
    statistics of every rank (and, through SyncBatchNorm's backward, their gradients): the
    step would no longer be the other ranks' batch alone.
    """
    handles = []
    for module in model.modules():
        if isinstance(module, nn.SyncBatchNorm):
            handles.append(module.register_forward_pre_hook(_upcast_empty))
            handles.append(module.register_forward_hook(_restore_dtype))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _upcast_empty(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    (x, *rest) = args
    module._empty_input_dtype = x.dtype  # type: ignore[attr-defined]
    if x.numel() == 0 and _stats_dtype(x.dtype) != x.dtype:
        return (x.to(_stats_dtype(x.dtype)), *rest)
    return None


def _restore_dtype(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    dtype = module.__dict__.pop("_empty_input_dtype", None)
    if isinstance(output, torch.Tensor) and dtype is not None and output.dtype != dtype:
        return output.to(dtype)
    return None
