"""Exports a checkpoint so that other tools load it without ssl_mt.

    python -m ssl_mt.export CKPT --out DIR [--onnx] [--size PX]

``CKPT`` is a Lightning checkpoint of either app:

- pretraining (:class:`ssl_mt.models.ssl_base.SSLModule`): ``DIR`` becomes a folder in timm's
  hub layout (``config.json`` + ``model.safetensors``), exactly what a pretraining run writes
  at its end: ``timm.create_model("local-dir:DIR", pretrained=True)`` loads it, the folder
  uploaded to the Hugging Face Hub loads with ``hf-hub:``, and ``backbone.weights=DIR``
  starts a fine-tuning run from it;
- fine-tuning (:class:`ssl_mt.models.multitask.MultiTaskModule`): ``DIR/encoder.safetensors``
  (+ ``encoder.json``), the encoder tensors (``net.encoder.model.*``) under their plain timm
  names. The encoder is timm's ``features_only`` model, so layers after the last feature map
  (EfficientNet's ``conv_head``/``bn2``) are not in the file: it loads into smp ``tu-<name>``
  encoders and ``backbone.weights`` of a fine-tuning run, or into timm with ``strict=False``.
  ``--onnx`` also writes the whole multi-task model as ``DIR/model.onnx`` (+ ``model.json``;
  see :mod:`ssl_mt.models.onnx_export`).

The model name comes from the checkpoint's saved hyper-parameters (``backbone.name``).
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import sys
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor

from ssl_mt.checkpointing import resolve_best
from ssl_mt.models.backbone import (
    BackboneError,
    architecture_args,
    create_backbone,
    export_backbone,
    match_state_dict,
)
from ssl_mt.safe_loading import (
    CLI_OPT_IN,
    UnsafeCheckpointError,
    add_trust_argument,
    load_checkpoint_file,
)
from ssl_mt.shutdown import freeze_heap_at_exit

log = logging.getLogger(__name__)

PRETRAIN_PREFIX = "backbone."
FINETUNE_PREFIX = "net.encoder.model."
# ``torch.compile`` wrappers put this between the module name and its tensors.
COMPILED_INFIX = "_orig_mod."
ENCODER_FILE = "encoder.safetensors"


# What ``torch.load`` raises for a file that is no (whole) ``torch.save`` file.
_NOT_A_TORCH_FILE = (
    pickle.UnpicklingError,
    zipfile.BadZipFile,
    EOFError,
    RuntimeError,
    ValueError,
    KeyError,
    AttributeError,
    ImportError,
    UnicodeDecodeError,
)


class ExportError(ValueError):
    """The file cannot be exported; the message says why."""


def load_checkpoint(path: str | Path, trust: bool = False) -> dict[str, Any]:
    """Reads a Lightning checkpoint on the CPU, weights-only (tensors and plain containers).

    Args:
        path: The checkpoint.
        trust: ``--trust-checkpoint``: the user made this file (e.g. an older run whose
            hyper-parameters are OmegaConf objects) and allows full unpickling of it.

    Raises:
        FileNotFoundError: No such file.
        UnsafeCheckpointError: Not trusted, and the file holds pickled Python objects.
        ExportError: The file is not a checkpoint.
    """
    path = resolve_best(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    not_ckpt = ExportError(
        f"{path} is not a Lightning checkpoint (a torch.save file with a 'state_dict'); "
        "pass e.g. RUN/checkpoints/last.ckpt"
    )
    try:
        ckpt = load_checkpoint_file(path, trust=trust, opt_in=CLI_OPT_IN)
    except UnsafeCheckpointError:
        raise
    except _NOT_A_TORCH_FILE as err:
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


def training_normalization(
    ckpt_path: str | Path, hparams: Mapping[str, Any] | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The input ``mean``/``std`` a checkpoint's model was trained with.

    From its hyper-parameters (``preprocess``, fine-tuning), else from the composed config
    Hydra keeps next to the run's checkpoints (``RUN/.hydra/config.yaml``, ``augment``);
    None when neither says.
    """
    from omegaconf import OmegaConf

    preprocess = (hparams or {}).get("preprocess") or {}
    if "mean" in preprocess and "std" in preprocess:
        return tuple(preprocess["mean"]), tuple(preprocess["std"])
    composed = Path(ckpt_path).resolve().parent.parent / ".hydra" / "config.yaml"
    if not composed.is_file():
        return None
    augment = OmegaConf.load(composed).get("augment") or {}
    if "mean" not in augment or "std" not in augment:
        return None
    return tuple(augment["mean"]), tuple(augment["std"])


def _write_encoder_file(tensors: Mapping[str, Tensor], out: Path, meta: Mapping[str, Any]) -> Path:
    """``out`` (safetensors) + ``out`` with suffix ``.json``, each written atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    state = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(state, str(tmp), metadata={"format": "pt", "model_name": str(meta["model_name"])})
    tmp.replace(out)
    json_path = out.with_suffix(".json")
    json_tmp = json_path.with_name(json_path.name + ".tmp")
    json_tmp.write_text(json.dumps({**meta, "num_tensors": len(state)}, indent=2) + "\n")
    json_tmp.replace(json_path)
    return out


def export_checkpoint(
    ckpt_path: str | Path,
    out: str | Path,
    onnx: bool = False,
    size: int | None = None,
    trust: bool = False,
) -> Path:
    """Writes the export of a pretraining or fine-tuning checkpoint into the folder ``out``.

    Args:
        ckpt_path: The checkpoint.
        out: The output folder (created; an existing export there is replaced).
        onnx: Fine-tuning checkpoints only: also write ``out/model.onnx``.
        size: ONNX example input side (default: the last evaluation size of the run).
        trust: ``--trust-checkpoint`` (see :func:`load_checkpoint`).

    Returns:
        ``out``.

    Raises:
        FileNotFoundError: The checkpoint does not exist.
        ExportError: Not a checkpoint, no backbone in it, or ``out`` is a file name.
        UnsafeCheckpointError: The checkpoint holds pickled Python objects (not trusted).
        BackboneError: The tensors do not fit the model named in its hyper-parameters.
    """
    ckpt_path, out = resolve_best(ckpt_path), Path(out)
    if out.suffix in (".safetensors", ".pt", ".pth", ".onnx") or out.is_file():
        raise ExportError(
            f"--out is a folder (an export is config.json + model.safetensors, or "
            f"encoder.safetensors and model.onnx), got {out}"
        )
    ckpt = load_checkpoint(ckpt_path, trust=trust)
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
    hparams = hparams if isinstance(hparams, Mapping) else {}
    extra: dict[str, Any] = {
        "source_checkpoint": str(ckpt_path),
        "epoch": ckpt.get("epoch"),
        "global_step": ckpt.get("global_step"),
    }
    if pretrain:
        if onnx:
            raise ExportError(
                f"{ckpt_path} is a pretraining checkpoint: --onnx exports fine-tuned "
                "multi-task models (the backbone folder loads in timm, which exports it)"
            )
        subset = match_state_dict(model, pretrain, f"{ckpt_path} (backbone.*)")
        model.load_state_dict(subset, strict=True)
        extra["source"] = "pretrain"
        norm = training_normalization(ckpt_path, hparams)
        mean, std = norm if norm else (None, None)
        return export_backbone(
            model,
            name,
            out,
            image_size=hparams.get("image_size"),
            mean=mean,
            std=std,
            model_args=architecture_args(backbone),
            extra=extra,
        )

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
    sizes = hparams.get("eval_sizes")
    image_size = int(list(sizes)[-1]) if sizes else None
    meta = {
        "model_name": name,
        "image_size": image_size,
        **extra,
        "source": "finetune",
        "format": "timm state dict of the features_only encoder (plain timm names)",
        "not_in_file": left_out,
        "load_with_timm": (
            f"timm.create_model({name!r}, num_classes=0).load_state_dict(state, strict=False) "
            f"(the {len(left_out)} tensors after the last feature map are not in the file)"
        ),
        "load_with_ssl_mt": f"python -m ssl_mt.finetune backbone.name={name} "
        f"backbone.weights={out / ENCODER_FILE}",
    }
    out.mkdir(parents=True, exist_ok=True)
    _write_encoder_file(renamed, out / ENCODER_FILE, meta)
    if onnx:
        from ssl_mt.models.multitask import MultiTaskModule
        from ssl_mt.models.onnx_export import export_onnx

        norm = training_normalization(ckpt_path, hparams)
        if norm is None:
            raise ExportError(
                f"{ckpt_path}: neither the checkpoint nor its run folder records the input "
                "normalisation (augment.mean/std) the model was trained with"
            )
        # The module from the tensors already read: the file is loaded once, weights-only.
        module = MultiTaskModule(**dict(hparams))
        module.load_state_dict(state, strict=True)
        export_onnx(module, out, size=size or image_size or 224, mean=norm[0], std=norm[1])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ssl_mt.export",
        description="Export a checkpoint: a pretraining one as a timm hub folder "
        "(config.json + model.safetensors), a fine-tuning one as its encoder "
        "(encoder.safetensors) and, with --onnx, the whole multi-task model (model.onnx).",
    )
    parser.add_argument(
        "ckpt",
        type=Path,
        help="Lightning checkpoint, e.g. RUN/checkpoints/last.ckpt or RUN/checkpoints/best.ckpt "
        "(a fine-tuning run's best_epoch*.ckpt)",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--onnx", action="store_true", help="fine-tuning checkpoints: also write model.onnx"
    )
    parser.add_argument(
        "--size", type=int, default=None, help="ONNX example input side (default: last eval size)"
    )
    add_trust_argument(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = export_checkpoint(
            args.ckpt, args.out, onnx=args.onnx, size=args.size, trust=args.trust_checkpoint
        )
    except (FileNotFoundError, ExportError, BackboneError, UnsafeCheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return 0


if __name__ == "__main__":
    freeze_heap_at_exit()
    sys.exit(main())
