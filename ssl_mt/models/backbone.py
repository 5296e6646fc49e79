"""Backbone factory: timm models by name, from random, hub or local weights.

Exported backbones are plain timm state dicts (``backbone.safetensors``) plus a
``backbone.json`` describing them, so timm and segmentation_models_pytorch load them
without ssl_mt.
"""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

log = logging.getLogger(__name__)

# timm's hub layout (what `timm.create_model("local-dir:DIR")` and `hf-hub:` read).
HUB_CONFIG = "config.json"
HUB_WEIGHTS = "model.safetensors"


class BackboneError(ValueError):
    """A backbone name or weights file cannot be used; the message says how to fix it."""


def check_model_name(name: str) -> None:
    """Raises a :class:`BackboneError` naming close matches for an unknown timm model."""
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise BackboneError(
        f"unknown timm model {name!r}.{hint} (`timm.list_models('*pattern*')` lists them)"
    )


def weights_file(path: str | Path) -> Path:
    """The weights file of ``path``: the file itself, or ``model.safetensors`` of an export
    folder (timm's hub layout)."""
    path = Path(path)
    if path.is_dir():
        inner = path / HUB_WEIGHTS
        if not inner.is_file():
            raise FileNotFoundError(
                f"backbone weights folder {path} has no {HUB_WEIGHTS} (expected an export "
                "folder of `python -m ssl_mt.pretrain` or `python -m ssl_mt.export`)"
            )
        return inner
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    return path


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads a state dict from ``.safetensors``, a torch file (``state_dict`` inside ok), or
    an export folder (its ``model.safetensors``)."""
    path = weights_file(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise BackboneError(f"{path}: expected a state dict, found {type(state).__name__}")
    return dict(state)


def is_classifier_key(key: str, model: nn.Module) -> bool:
    names = getattr(model, "pretrained_cfg", {}).get("classifier", "classifier")
    names = (names,) if isinstance(names, str) else tuple(names)
    return any(key == n or key.startswith(n + ".") for n in names)


def match_state_dict(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str,
    optional: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """Checks that ``state`` provides every tensor ``model`` needs, with the right shapes.

    Args:
        model: The module to load into.
        state: The tensors available.
        source: Where the tensors came from (for messages).
        optional: Key prefixes the model may lack in ``state`` (e.g. a classifier).

    Returns:
        The subset of ``state`` that ``model`` uses.

    Raises:
        BackboneError: listing missing keys and shape mismatches.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not any(k.startswith(p) for p in optional)]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or mismatched:
        lines = [f"{source} does not fit the model:"]
        if missing:
            lines.append(f"  {len(missing)} missing key(s): {missing[:20]}")
        if mismatched:
            lines.append(f"  {len(mismatched)} shape mismatch(es): {mismatched[:20]}")
        lines.append("  Was it exported from the same `backbone.name`?")
        raise BackboneError("\n".join(lines))
    return {k: state[k] for k in expected if k in state}


def create_backbone(
    name: str,
    pretrained: bool = False,
    weights: str | Path | None = None,
    grad_checkpointing: bool = False,
    **timm_kwargs,
) -> nn.Module:
    """Creates a timm model without classifier (``num_classes=0``: forward gives pooled features).

    Args:
        name: Any timm model name.
        pretrained: Download timm's hub weights (needs network access).
        weights: A local state dict (e.g. an ssl_mt export) loaded on top; every backbone
            key must match (only a classifier may be absent).
        grad_checkpointing: Trade compute for memory (activation checkpointing).
        **timm_kwargs: Passed to ``timm.create_model`` (e.g. ``drop_path_rate``).
    """
    check_model_name(name)
    if pretrained and weights:
        raise BackboneError("choose backbone.pretrained=true OR backbone.weights=PATH, not both")
    model = timm.create_model(name, pretrained=pretrained, num_classes=0, **timm_kwargs)
    if weights:
        state = load_weights_file(weights)
        subset = match_state_dict(model, state, str(weights))
        model.load_state_dict(subset, strict=True)
        log.info("loaded %d tensors from %s into %s", len(subset), weights, name)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def hub_state_dict(name: str, **timm_kwargs) -> dict[str, torch.Tensor]:
    """timm's pretrained weights of ``name`` (downloads them or reads timm's cache)."""
    model = timm.create_model(name, pretrained=True, num_classes=0, **timm_kwargs)
    return model.state_dict()


# ``backbone`` config keys that are not timm arguments.
_NOT_TIMM = ("name", "pretrained", "weights", "grad_checkpointing", "decoder_channels")


def initial_state(backbone: Mapping[str, object]) -> tuple[dict[str, torch.Tensor], str] | None:
    """The weights a new run starts its backbone from, per the ``backbone`` config.

    The apps call this when they build a new run; a module restored from a checkpoint never
    does (its tensors come from the checkpoint, its hyper-parameters only record where the
    init came from), so checkpoints load offline and wherever the weights file went.

    Returns:
        ``(plain timm state dict, where it came from)``, or ``None`` for a random init.
    """
    pretrained, weights = bool(backbone.get("pretrained")), backbone.get("weights")
    if pretrained and weights:
        raise BackboneError("choose backbone.pretrained=true OR backbone.weights=PATH, not both")
    if weights:
        return load_weights_file(weights), str(weights_file(weights))
    if pretrained:
        name = str(backbone["name"])
        timm_kwargs = {k: v for k, v in backbone.items() if k not in _NOT_TIMM}
        return hub_state_dict(name, **timm_kwargs), f"timm's pretrained {name}"
    return None


def export_backbone(
    model: nn.Module,
    name: str,
    out: str | Path,
    image_size: int | None = None,
    extra: Mapping[str, object] | None = None,
) -> Path:
    """Writes ``model``'s state dict as safetensors plus a ``.json`` describing it.

    Only the process that calls this writes; under DDP call it from rank 0. The write goes to
    a temporary file first, so a crash never leaves a half-written export.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().to("cpu").contiguous()
        for k, v in model.state_dict().items()
        if not is_classifier_key(k, model)
    }
    tmp = out.with_name(out.name + ".tmp")
    save_file(state, str(tmp), metadata={"model_name": name})
    tmp.replace(out)
    meta = {
        "model_name": name,
        "image_size": image_size,
        "num_tensors": len(state),
        "format": "timm state dict without classifier",
        "load_with_timm": (
            f"timm.create_model({name!r}, pretrained=True, num_classes=0, "
            f"pretrained_cfg_overlay=dict(file={str(out.name)!r}))"
        ),
        "load_with_smp": f"segmentation_models_pytorch encoder 'tu-{name}': "
        "encoder.model.load_state_dict(state, strict=False) and check missing_keys; timm "
        "features_only models of some families rename stages ('stages.0' -> 'stages_0'): "
        "rename keys first (ssl_mt.models.multitask_net.timm_key gives the mapping)",
        "load_with_ssl_mt": f"python -m ssl_mt.finetune backbone.name={name} backbone.weights={out}",
        **(extra or {}),
    }
    json_path = out.with_suffix(".json")
    json_tmp = json_path.with_name(json_path.name + ".tmp")
    json_tmp.write_text(json.dumps(meta, indent=2) + "\n")
    json_tmp.replace(json_path)
    return out
