"""Runs a fine-tuned checkpoint on new photos.

    python -m ssl_mt.predict CKPT INPUT --out DIR [--size PX] [--overlays] [--metrics]

``INPUT`` is a folder of images (recursive; hidden files and macOS ``._*`` companions are
skipped) or a ``labels.csv`` manifest. Writes, through Lightning's predict loop (batched, on
the GPU when there is one, bf16 where supported):

- ``DIR/masks/<task>/<relative path>.png`` per segmentation task: 0/255 at the image's
  original size (the logits are resized bilinearly, then thresholded at probability 0.5);
- ``DIR/predictions.csv``: ``image`` (relative path), then per classification task its
  label and ``<task>/p_<class>`` probabilities;
- with ``--overlays``: ``DIR/overlays/<relative path>.png``, the image with masks and labels;
- with ``--metrics`` on a manifest: ``DIR/metrics.json`` and a table per task, on the
  labeled images (segmentation at the original size).

The input size (the last training stage's) and the normalisation come from the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from ssl_mt.callbacks.prediction_writer import PredictionWriter
from ssl_mt.checkpointing import resolve_best
from ssl_mt.console import quiet_known_noise
from ssl_mt.data.image_io import BadSampleError, bad_sample_message
from ssl_mt.data.manifest import ManifestError
from ssl_mt.data.predict_dataset import (
    PredictDataset,
    collate_predict,
    collect_inputs,
)
from ssl_mt.export import ExportError, load_checkpoint, training_normalization
from ssl_mt.safe_loading import add_trust_argument
from ssl_mt.shutdown import freeze_heap_at_exit

log = logging.getLogger(__name__)

SIZE_MULTIPLE = 32  # the encoder's output stride


class PredictError(ValueError):
    """The checkpoint or the options cannot be used; the message says why."""


def load_module(ckpt_path: str | Path, trust: bool = False):
    """The :class:`~ssl_mt.models.multitask.MultiTaskModule` of a fine-tuning checkpoint, on
    the CPU, in eval mode, and its hyper-parameters. The file is read weights-only unless
    ``trust`` (``--trust-checkpoint``)."""
    from ssl_mt.models.multitask import MultiTaskModule

    ckpt = load_checkpoint(ckpt_path, trust=trust)
    hparams = ckpt.get("hyper_parameters") or {}
    if "tasks" not in hparams:
        raise PredictError(
            f"{ckpt_path} is not a fine-tuning checkpoint (no tasks in its hyper-parameters); "
            "predict needs RUN/checkpoints/*.ckpt of `python -m ssl_mt.finetune`"
        )
    module = MultiTaskModule(**dict(hparams))
    module.load_state_dict(ckpt["state_dict"], strict=True)
    module.compile_model = False  # one fixed size; not worth a compile
    return module.eval(), dict(hparams)


def inference_size(ckpt_path: str | Path, hparams: Mapping[str, Any]) -> int:
    """The last training stage's size: recorded in the checkpoint, else in the run's
    composed config (``RUN/.hydra/config.yaml``)."""
    size = (hparams.get("preprocess") or {}).get("size")
    if size is None:
        from omegaconf import OmegaConf

        composed = Path(ckpt_path).resolve().parent.parent / ".hydra" / "config.yaml"
        if composed.is_file():
            stages = OmegaConf.load(composed).get("schedule", {}).get("stages")
            size = stages[-1]["size"] if stages else None
    if size is None:
        raise PredictError(
            f"{ckpt_path}: the training size is not recorded (nor is RUN/.hydra/config.yaml "
            "next to it); pass --size PX"
        )
    return int(size)


def auto_precision() -> str:
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def predict(
    ckpt_path: str | Path,
    source: str | Path,
    out: str | Path,
    size: int | None = None,
    batch_size: int = 16,
    workers: int = 2,
    overlays: bool = False,
    metrics: bool = False,
    accelerator: str = "auto",
    precision: str | None = None,
    trust: bool = False,
) -> dict[str, Any]:
    """Predicts every image of ``source`` (see the module docstring).

    ``trust``: ``--trust-checkpoint``, full unpickling of a checkpoint holding Python objects.

    Returns:
        ``{"images": count, "metrics": per task or None}``.

    Raises:
        FileNotFoundError, ExportError, PredictError, ManifestError, BadSampleError,
            UnsafeCheckpointError: with the file named.
    """
    ckpt_path, out = resolve_best(ckpt_path), Path(out)
    module, hparams = load_module(ckpt_path, trust=trust)
    norm = training_normalization(ckpt_path, hparams)
    if norm is None:
        raise PredictError(
            f"{ckpt_path}: neither the checkpoint nor its run folder records the input "
            "normalisation (augment.mean/std) the model was trained with"
        )
    size = int(size) if size else inference_size(ckpt_path, hparams)
    if size <= 0 or size % SIZE_MULTIPLE:
        raise PredictError(f"--size must be a positive multiple of {SIZE_MULTIPLE}, got {size}")
    inputs = collect_inputs(source, module.tasks)
    if metrics and inputs.samples is None:
        raise PredictError(f"--metrics needs labels: give a labels.csv, not the folder {source}")
    dataset = PredictDataset(
        inputs, module.tasks, size, {"mean": norm[0], "std": norm[1]}, with_labels=metrics
    )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_predict,
        pin_memory=torch.cuda.is_available(),
    )
    quiet_known_noise()
    writer = PredictionWriter(inputs, module.tasks, out, overlays=overlays, metrics=metrics)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision or auto_precision(),
        logger=False,
        callbacks=[writer],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=sys.stderr.isatty(),
    )
    log.info("predicting %d images at %d px from %s", len(dataset), size, ckpt_path)
    trainer.predict(module, dataloaders=loader, return_predictions=False)
    results = writer.results() if metrics else None
    if results is not None:
        (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    return {"images": writer.rows, "size": size, "metrics": results}


def format_metrics(results: Mapping[str, Mapping[str, float]]) -> str:
    lines = [f"{'task':<12} {'labeled':>7}  metrics"]
    for task, entry in results.items():
        values = "  ".join(f"{k}={v:.4f}" for k, v in entry.items() if k != "labeled")
        lines.append(f"{task:<12} {int(entry['labeled']):>7}  {values}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ssl_mt.predict",
        description="Masks at original size and class probabilities of new photos.",
    )
    parser.add_argument(
        "ckpt",
        type=Path,
        help="fine-tuning checkpoint: RUN/checkpoints/*.ckpt; best.ckpt is the best_epoch*.ckpt",
    )
    parser.add_argument("input", type=Path, help="folder of images, or a labels.csv manifest")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--size", type=int, default=None, help="input size (default: training's)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="data loader processes")
    parser.add_argument("--overlays", action="store_true", help="also write overlay PNGs")
    parser.add_argument(
        "--metrics", action="store_true", help="labels.csv input: report metrics per task"
    )
    parser.add_argument("--accelerator", default="auto", help="auto | cpu | gpu")
    add_trust_argument(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = predict(
            args.ckpt,
            args.input,
            args.out,
            size=args.size,
            batch_size=args.batch_size,
            workers=args.workers,
            overlays=args.overlays,
            metrics=args.metrics,
            accelerator=args.accelerator,
            trust=args.trust_checkpoint,
        )
    except (FileNotFoundError, ExportError, PredictError, ManifestError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BadSampleError as err:
        print(f"error: {bad_sample_message(err)}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {result['images']} images at {result['size']} px")
    if result["metrics"] is not None:
        print(format_metrics(result["metrics"]))
    return 0


if __name__ == "__main__":
    freeze_heap_at_exit()
    sys.exit(main())
