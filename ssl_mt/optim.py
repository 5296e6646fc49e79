"""Optimisers shared by both apps (the learning-rate plan is :mod:`ssl_mt.lr_plan`).

- Biases and normalisation parameters (every tensor with fewer than 2 dimensions) get no
  weight decay and, under LARS, no trust-ratio adaptation (timm's ``Lars`` adapts only
  groups with non-zero weight decay).
- Each group's lr is the planned peak lr × its ``lr_scale``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from torch import nn

OPTIMIZERS = ("lars", "adamw", "sgd")


def decay_groups(
    modules: nn.Module | Sequence[nn.Module],
    weight_decay: float,
    lr_scale: float = 1.0,
    tag: str = "",
) -> list[dict[str, Any]]:
    """Two parameter groups: weights (with decay) and biases/norms (without).

    Each group carries ``lr_scale`` (multiplies the scheduled lr), ``tag`` (e.g.
    ``backbone``, which :class:`~ssl_mt.lr_plan.WarmupCosine` uses for freezing) and ``name`` (how
    Lightning's LearningRateMonitor labels it; names must be unique per optimiser, so pass
    all modules that share a tag in one call).
    """
    if isinstance(modules, nn.Module):
        modules = [modules]
    decay, no_decay = [], []
    params = [p for module in modules for p in module.parameters()]
    for param in params:
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 else decay).append(param)
    groups = []
    if decay:
        groups.append(
            {
                "params": decay,
                "weight_decay": weight_decay,
                "lr_scale": lr_scale,
                "tag": tag,
                "name": tag,
            }
        )
    if no_decay:
        groups.append(
            {
                "params": no_decay,
                "weight_decay": 0.0,
                "lr_scale": lr_scale,
                "tag": tag,
                "name": f"{tag}_no_decay",
            }
        )
    return groups


def build_optimizer(
    groups: Sequence[dict[str, Any]], cfg: Mapping[str, Any], lr: float
) -> torch.optim.Optimizer:
    """Creates the optimiser named by ``cfg.name`` through timm's factory.

    Every group's lr is ``lr × lr_scale``. AdamW uses the fused CUDA kernel when the
    parameters live on a GPU.
    """
    name = cfg["name"]
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.name must be one of {OPTIMIZERS}, got {name!r}")
    params = []
    for group in groups:
        group = dict(group)
        group["lr"] = lr * group.get("lr_scale", 1.0)
        params.append(group)
    kwargs: dict[str, Any] = {}
    if name in ("lars", "sgd"):
        kwargs["momentum"] = cfg.get("momentum", 0.9)
    if name == "lars":
        kwargs["trust_coeff"] = cfg.get("trust_coeff", 0.001)
    if name == "adamw":
        kwargs["betas"] = tuple(cfg.get("betas", (0.9, 0.999)))
        first = next(iter(params[0]["params"]))
        if first.is_cuda:
            kwargs["fused"] = True
    return create_optimizer_v2(
        params, opt=name, lr=lr, weight_decay=cfg.get("weight_decay", 0.0), **kwargs
    )
