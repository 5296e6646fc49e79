"""Exports the backbone of a checkpoint as plain timm weights.

    python -m ssl_mt.export CKPT --out backbone.safetensors

``CKPT`` is a Lightning checkpoint of either app:

- pretraining (:class:`ssl_mt.models.ssl_base.SSLModule`): the ``backbone.*`` tensors, a
  whole timm model without classifier, exactly what a pretraining run writes at its end;
- fine-tuning (:class:`ssl_mt.models.multitask.MultiTaskModule`): the encoder tensors
  (``net.encoder.model.*``) under their plain timm names. The encoder is timm's
  ``features_only`` model, so layers after the last feature map (EfficientNet's
  ``conv_head``/``bn2``) are not in the file: it loads into smp ``tu-<name>`` encoders and
  ``backbone.weights`` of a fine-tuning run, or into timm with ``strict=False``.

The model name comes from the checkpoint's saved hyper-parameters (``backbone.name``).
Writes ``OUT`` (safetensors) and ``OUT`` with suffix ``.json`` (what it is, how to load it).
"""

from __future__ import annotations

import argparse
import logging
import pickle
import sys
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ssl_mt.models.backbone import (
    BackboneError,
    create_backbone,
    export_backbone,
    match_state_dict,
)

log = logging.getLogger(__name__)

PRETRAIN_PREFIX = "backbone."
FINETUNE_PREFIX = "net.encoder.model."
# ``torch.compile`` wrappers put this between the module name and its tensors.
COMPILED_INFIX = "_orig_mod."


class ExportError(ValueError):
    """The file cannot be exported; the message says why."""


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Reads a Lightning checkpoint on the CPU.

    Tries a weights-only load first. Checkpoints of the apps hold their Hydra config
    (OmegaConf objects) in ``hyper_parameters``, which needs full unpickling, as Lightning
    itself does to resume: export only checkpoints you trust.

    Raises:
        FileNotFoundError: No such file.
        ExportError: The file is not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    not_ckpt = ExportError(
        f"{path} is not a Lightning checkpoint (a torch.save file with a 'state_dict'); "
        "pass e.g. RUN/checkpoints/last.ckpt"
    )
    errors = (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except errors:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except (*errors, AttributeError, ImportError, UnicodeDecodeError) as err:
            raise not_ckpt from err
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("state_dict"), Mapping):
        raise not_ckpt
    return dict(ckpt)


def _backbone_config(ckpt: Mapping[str, Any], path: Path) -> dict[str, Any]:
    hparams = ckpt.get("hyper_parameters") or {}
    backbone = hparams.get("backbone") if isinstance(hparams, Mapping) else None
    if not isinstance(backbone, Mapping) or not backbone.get("name"):
        raise ExportError(
            f"{path}: the checkpoint's hyper_parameters have no backbone.name, so the timm "
            "model cannot be rebuilt (was it written by ssl_mt.pretrain or ssl_mt.finetune?)"
        )
    return dict(backbone)


def _strip(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The tensors under ``prefix``, renamed without it (and without compile wrappers)."""
    out = {}
    for key, value in state.items():
        if key.startswith(prefix):
            name = key[len(prefix) :]
            if name.startswith(COMPILED_INFIX):
                name = name[len(COMPILED_INFIX) :]
            out[name] = value
    return out


def _timm_kwargs(backbone: Mapping[str, Any]) -> dict[str, Any]:
    """The backbone config as ``create_backbone`` arguments, without loading any weights."""
    kwargs = {k: v for k, v in backbone.items() if k != "decoder_channels"}
    kwargs.update(pretrained=False, weights=None, grad_checkpointing=False)
    return kwargs


class _Tensors(nn.Module):
    """A fixed set of named tensors that :func:`export_backbone` can write."""

    def __init__(self, tensors: Mapping[str, Tensor], pretrained_cfg: Mapping[str, Any]) -> None:
        super().__init__()
        self._tensors = dict(tensors)
        self.pretrained_cfg = dict(pretrained_cfg)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:  # type: ignore[override]
        return dict(self._tensors)


def export_checkpoint(ckpt_path: str | Path, out: str | Path) -> Path:
    """Writes the backbone of a pretraining or fine-tuning checkpoint as plain timm weights.

    Returns:
        ``out``.

    Raises:
        FileNotFoundError: The checkpoint does not exist.
        ExportError: Not a checkpoint, or no backbone in it.
        BackboneError: The tensors do not fit the model named in its hyper-parameters.
    """
    ckpt_path, out = Path(ckpt_path), Path(out)
    if out.suffix != ".safetensors":
        raise ExportError(f"--out must end with .safetensors, got {out}")
    ckpt = load_checkpoint(ckpt_path)
    state = ckpt["state_dict"]
    pretrain = _strip(state, PRETRAIN_PREFIX)
    finetune = _strip(state, FINETUNE_PREFIX)
    if not pretrain and not finetune:
        raise ExportError(
            f"{ckpt_path}: no backbone tensors in the checkpoint (expected keys starting with "
            f"{PRETRAIN_PREFIX!r} from ssl_mt.pretrain or {FINETUNE_PREFIX!r} from "
            "ssl_mt.finetune)"
        )
    backbone = _backbone_config(ckpt, ckpt_path)
    name = str(backbone["name"])
    model = create_backbone(**_timm_kwargs(backbone))  # checks the name first
    hparams = ckpt.get("hyper_parameters") or {}
    extra: dict[str, Any] = {
        "source_checkpoint": str(ckpt_path),
        "epoch": ckpt.get("epoch"),
        "global_step": ckpt.get("global_step"),
    }
    if pretrain:
        subset = match_state_dict(model, pretrain, f"{ckpt_path} (backbone.*)")
        model.load_state_dict(subset, strict=True)
        extra["source"] = "pretrain"
        image_size = hparams.get("image_size") if isinstance(hparams, Mapping) else None
        return export_backbone(model, name, out, image_size=image_size, extra=extra)

    from ssl_mt.models.multitask_net import timm_key

    renamed = {timm_key(k): v for k, v in finetune.items()}
    expected = model.state_dict()
    unknown = [k for k in renamed if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs {name} {tuple(expected[k].shape)}"
        for k, v in renamed.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if unknown or mismatched:
        raise BackboneError(
            f"{ckpt_path}: the encoder tensors do not fit timm's {name!r}: "
            f"{len(unknown)} unknown key(s) {unknown[:20]}, "
            f"{len(mismatched)} shape mismatch(es) {mismatched[:20]}"
        )
    left_out = sorted(k for k in expected if k not in renamed)
    extra.update(
        source="finetune",
        format="timm state dict of the features_only encoder (plain timm names)",
        not_in_file=left_out,
        load_with_timm=(
            f"timm.create_model({name!r}, num_classes=0).load_state_dict(state, strict=False) "
            f"(the {len(left_out)} tensors after the last feature map are not in the file)"
        ),
    )
    image_size = None
    sizes = hparams.get("eval_sizes") if isinstance(hparams, Mapping) else None
    if sizes:
        image_size = int(list(sizes)[-1])
    holder = _Tensors(renamed, getattr(model, "pretrained_cfg", {}))
    return export_backbone(holder, name, out, image_size=image_size, extra=extra)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ssl_mt.export",
        description="Write the backbone of a pretraining or fine-tuning checkpoint as a plain "
        "timm state dict (safetensors) plus a .json describing it.",
    )
    parser.add_argument(
        "ckpt", type=Path, help="Lightning checkpoint, e.g. RUN/checkpoints/last.ckpt"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="output file, e.g. backbone.safetensors"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = export_checkpoint(args.ckpt, args.out)
    except (FileNotFoundError, ExportError, BackboneError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
