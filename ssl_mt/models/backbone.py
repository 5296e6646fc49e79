"""Backbone factory: timm models by name, from random, hub or local weights.

Exported backbones are folders in timm's hub layout: ``config.json`` (timm's pretrained_cfg
format) and ``model.safetensors`` (a plain timm state dict without classifier), so
``timm.create_model("local-dir:FOLDER", pretrained=True)`` loads them as they are, the same
folder uploaded to the Hugging Face Hub loads with ``hf-hub:``, and segmentation_models_pytorch
``tu-`` encoders take ``model.safetensors``.
"""

from __future__ import annotations

import difflib
import json
import logging
import shutil
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


def architecture_args(backbone: Mapping[str, object]) -> dict[str, object]:
    """The timm arguments of a ``backbone`` config that shape the weights (for ``model_args``
    of an export); training-only ones (stochastic depth, dropout) are left out."""
    training_only = ("drop_path_rate", "drop_rate")
    return {k: v for k, v in backbone.items() if k not in _NOT_TIMM and k not in training_only}


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


# pretrained_cfg fields that describe the weights' input, kept in an export's config.json.
_INPUT_FIELDS = (
    "input_size",
    "interpolation",
    "crop_pct",
    "crop_mode",
    "mean",
    "std",
    "first_conv",
    "classifier",
    "fixed_input_size",
)


def hub_config(
    model: nn.Module,
    name: str,
    image_size: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    model_args: Mapping[str, object] | None = None,
    extra: Mapping[str, object] | None = None,
) -> dict[str, object]:
    """``config.json`` of an export: timm's hub format, plus an ``ssl_mt`` provenance block.

    ``input_size``, ``mean`` and ``std`` are those of training (the images the weights saw),
    not of the architecture's ImageNet weights; ``num_classes`` is 0 (pooled features).
    """
    source_cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    pretrained_cfg = {k: source_cfg[k] for k in _INPUT_FIELDS if source_cfg.get(k) is not None}
    if image_size:
        channels = (pretrained_cfg.get("input_size") or (3,))[0]
        pretrained_cfg["input_size"] = [int(channels), int(image_size), int(image_size)]
        pretrained_cfg["crop_pct"] = 1.0  # trained on whole resized images
    if mean is not None:
        pretrained_cfg["mean"] = [float(m) for m in mean]
    if std is not None:
        pretrained_cfg["std"] = [float(s) for s in std]
    pretrained_cfg["num_classes"] = 0
    config: dict[str, object] = {
        "architecture": name,
        "num_classes": 0,
        "num_features": int(getattr(model, "num_features", 0) or 0),
        "pretrained_cfg": pretrained_cfg,
    }
    if model_args:
        config["model_args"] = dict(model_args)
    config["ssl_mt"] = {
        "format": "timm hub layout: config.json + model.safetensors (no classifier)",
        "load_with_timm": 'timm.create_model("local-dir:THIS_FOLDER", pretrained=True)',
        "load_with_ssl_mt": "python -m ssl_mt.finetune backbone.weights=THIS_FOLDER",
        **(extra or {}),
    }
    return config


def export_backbone(
    model: nn.Module,
    name: str,
    out: str | Path,
    image_size: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    model_args: Mapping[str, object] | None = None,
    extra: Mapping[str, object] | None = None,
) -> Path:
    """Writes ``model`` (a timm model) as a folder in timm's hub layout; returns the folder.

    ``out/model.safetensors`` holds every tensor but the classifier's; ``out/config.json``
    says what it is (see :func:`hub_config`). Only the process that calls this writes; under
    DDP call it from rank 0. The folder is written next to ``out`` first and then renamed,
    so a crash never leaves a half-written export.
    """
    out = Path(out)
    if out.suffix in (".safetensors", ".pt", ".pth", ".bin"):
        raise BackboneError(
            f"{out}: an export is a folder (config.json + model.safetensors); give a folder path"
        )
    state = {
        k: v.detach().to("cpu").contiguous()
        for k, v in model.state_dict().items()
        if not is_classifier_key(k, model)
    }
    config = hub_config(model, name, image_size, mean, std, model_args, extra)
    config["ssl_mt"]["num_tensors"] = len(state)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(state, str(tmp / HUB_WEIGHTS), metadata={"format": "pt", "model_name": name})
    (tmp / HUB_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
