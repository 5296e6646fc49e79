"""Frozen-backbone evaluation: linear probe and kNN on the classification tasks.

    python -m ssl_mt.probe BACKBONE [BACKBONE ...] --data ROOT --out DIR [--size PX]

BACKBONE is one of
- ``RUN/backbone``: a pretraining export folder (timm's hub layout; the model name is its
  ``config.json``'s ``architecture``);
- ``random:<timm name>``: the same architecture, randomly initialised;
- ``imagenet:<timm name>``: timm's hub weights (needs network access), or
  ``imagenet:<timm name>=<file>`` for a local copy of them (offline): a ``.safetensors``
  file goes to timm's ``pretrained_cfg_overlay=dict(file=...)``; a torch file is read
  weights-only (``--trust-checkpoint`` allows full unpickling of one you made yourself) and
  handed to timm as ``pretrained_cfg_overlay=dict(state_dict=...)``.

Every backbone is scored on the same images: features of the manifest's train split
(resized to ``--size``, no augmentation) fit a logistic regression (scikit-learn, on
standardised features) and form the kNN memory bank (:func:`ssl_mt.models.knn.knn_predict`);
the val split is scored. The majority-class rate (always answering the train split's most
frequent class) is the floor a backbone that learned nothing reaches. Writes
``DIR/probe.csv`` and ``DIR/probe.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

try:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
except ImportError as error:  # an optional extra
    raise ImportError("ssl_mt.probe needs scikit-learn: pip install 'ssl_mt[probe]'") from error

from ssl_mt.config import load_group, load_tasks_config
from ssl_mt.data.datasets import MultiTaskDataset, collate_samples
from ssl_mt.data.manifest import load_manifest
from ssl_mt.data.transforms import build_finetune_transform
from ssl_mt.models.backbone import HUB_CONFIG, HUB_WEIGHTS, create_backbone
from ssl_mt.models.knn import knn_predict
from ssl_mt.safe_loading import CLI_OPT_IN, add_trust_argument, load_checkpoint_file
from ssl_mt.shutdown import freeze_heap_at_exit
from ssl_mt.tasks import TaskSpec, parse_tasks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone to probe: its label in the table and how to build it."""

    label: str
    name: str
    pretrained: bool = False
    weights: Path | None = None
    overlay_file: Path | None = None
    trust: bool = False

    def build(self) -> torch.nn.Module:
        kwargs = {}
        if self.overlay_file is not None and self.overlay_file.suffix == ".safetensors":
            kwargs["pretrained_cfg_overlay"] = {"file": str(self.overlay_file)}
        elif self.overlay_file is not None:
            state = overlay_state_dict(self.overlay_file, self.trust)
            kwargs["pretrained_cfg_overlay"] = {"state_dict": state}
        return create_backbone(
            self.name, pretrained=self.pretrained, weights=self.weights, **kwargs
        )


def overlay_state_dict(path: Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of a torch weights file, picked as timm's ``load_state_dict`` does.

    Weights-only, with ``argparse.Namespace`` allowed (timm's training checkpoints keep
    their arguments in one, and timm's own loader allows it too).

    Raises:
        UnsafeCheckpointError: The file holds other Python objects and ``trust`` is not set.
    """
    from timm.models import clean_state_dict

    checkpoint = load_checkpoint_file(
        path, trust=trust, opt_in=CLI_OPT_IN, allow=[argparse.Namespace]
    )
    if isinstance(checkpoint, dict):
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if checkpoint.get(key) is not None:
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(checkpoint).__name__}")
    return clean_state_dict(checkpoint)


def parse_backbone(text: str, trust: bool = False) -> BackboneSpec:
    """Parses one BACKBONE argument (see the module docstring); ``trust``: see
    :func:`overlay_state_dict`.

    Raises:
        ValueError: An unknown form, or a file that does not exist; the message names it.
        UnsafeCheckpointError: A torch weights file that holds Python objects (untrusted).
    """
    if text.startswith("random:"):
        return BackboneSpec(label=text, name=text.removeprefix("random:"))
    if text.startswith("imagenet:"):
        name, _, file = text.removeprefix("imagenet:").partition("=")
        overlay = Path(file) if file else None
        if overlay is not None and not overlay.is_file():
            raise ValueError(f"{text}: ImageNet weights file {overlay} does not exist")
        if overlay is not None and overlay.suffix != ".safetensors" and not trust:
            # Refused now, not after the backbones before it: cheap (mapped, weights-only).
            load_checkpoint_file(
                overlay,
                opt_in=CLI_OPT_IN,
                mmap=zipfile.is_zipfile(overlay),
                allow=[argparse.Namespace],
            )
        return BackboneSpec(
            label=text, name=name, pretrained=True, overlay_file=overlay, trust=trust
        )
    path = Path(text)
    if path.is_dir():
        config = path / HUB_CONFIG
        if not config.is_file() or not (path / HUB_WEIGHTS).is_file():
            raise ValueError(
                f"{text}: not an export folder ({HUB_CONFIG} + {HUB_WEIGHTS}) of "
                "`python -m ssl_mt.pretrain` or `python -m ssl_mt.export`"
            )
        name = json.loads(config.read_text())["architecture"]
        return BackboneSpec(label=text, name=name, weights=path)
    raise ValueError(
        f"backbone {text!r}: expected an export folder (RUN/backbone), random:<timm name> or "
        "imagenet:<timm name>[=<weights file>]"
    )


@torch.no_grad()
def extract(
    model: torch.nn.Module, loader: DataLoader, tasks: Sequence[TaskSpec]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Pooled features (N, D) and per-task labels (N,), -1 where unlabeled."""
    model.eval()
    features, labels = [], {t.name: [] for t in tasks}
    for batch in loader:
        features.append(model(batch["image"]).float())
        for t in tasks:
            labels[t.name].append(batch["target"][t.name])
    return (
        torch.cat(features).numpy(),
        {name: torch.cat(parts).numpy() for name, parts in labels.items()},
    )


def score_task(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    task: TaskSpec,
    k: int,
    c: float,
) -> list[dict[str, float | str | int]]:
    """Rows of the table for one task: linear probe, kNN and majority class."""
    train = train_y >= 0
    val = val_y >= 0
    if train.sum() == 0 or val.sum() == 0:
        raise ValueError(f"task {task.name}: no labeled samples in the train or val split")
    x, y, qx, qy = train_x[train], train_y[train], val_x[val], val_y[val]
    labels = list(range(task.num_classes))
    predictions = {}
    if len(np.unique(y)) > 1:
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
        predictions["linear"] = probe.fit(x, y).predict(qx)
    predictions["knn"] = knn_predict(
        torch.from_numpy(x), torch.from_numpy(y).long(), torch.from_numpy(qx), task.num_classes, k
    ).numpy()
    predictions["majority"] = np.full_like(qy, np.bincount(y).argmax())
    return [
        {
            "task": task.name,
            "method": method,
            "top1": float((predicted == qy).mean()),
            "f1": float(f1_score(qy, predicted, labels=labels, average="macro", zero_division=0)),
            "n_train": int(train.sum()),
            "n_val": int(val.sum()),
        }
        for method, predicted in predictions.items()
    ]


def run_probe(
    backbones: Sequence[str],
    data: Path,
    out: Path,
    size: int = 96,
    tasks: str = "default",
    augment: str = "finetune",
    k: int = 20,
    c: float = 1.0,
    batch_size: int = 64,
    num_workers: int = 0,
    trust: bool = False,
) -> pd.DataFrame:
    """Probes every backbone on the same split; writes ``probe.csv`` and ``probe.md``.

    ``trust``: ``--trust-checkpoint`` for torch weights files (see :func:`overlay_state_dict`).
    """
    specs = [parse_backbone(b, trust=trust) for b in backbones]
    cls_tasks = [t for t in parse_tasks(load_tasks_config(tasks)) if not t.is_segmentation]
    if not cls_tasks:
        raise ValueError(f"tasks {tasks!r}: no classification task to probe")
    samples = load_manifest(data, cls_tasks, require_columns=False)
    transform = build_finetune_transform(load_group("augment", augment), size, train=False)
    loaders = {}
    for split in ("train", "val"):
        subset = [
            s for s in samples if s.split == split and any(v is not None for v in s.labels.values())
        ]
        if not subset:
            raise ValueError(f"{data}: no labeled samples in split {split!r}")
        dataset = MultiTaskDataset(subset, cls_tasks, transform)
        loaders[split] = DataLoader(
            dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_samples
        )
    rows = []
    for spec in specs:
        model = spec.build()
        train_x, train_y = extract(model, loaders["train"], cls_tasks)
        val_x, val_y = extract(model, loaders["val"], cls_tasks)
        for task in cls_tasks:
            for row in score_task(train_x, train_y[task.name], val_x, val_y[task.name], task, k, c):
                rows.append({"backbone": spec.label, **row})
        log.info("probed %s (%d features)", spec.label, train_x.shape[1])
    table = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "probe.csv", index=False)
    (out / "probe.md").write_text(to_markdown(table, size, data))
    return table


def to_markdown(table: pd.DataFrame, size: int, data: Path) -> str:
    """One row per backbone and method, top-1 / macro-F1 per task."""
    wide = table.pivot_table(
        index=["backbone", "method"], columns="task", values=["top1", "f1"], sort=False
    )
    tasks = list(dict.fromkeys(table["task"]))
    header = "| backbone | method | " + " | ".join(f"{t} top-1 | {t} F1" for t in tasks) + " |"
    lines = [
        f"# Frozen-backbone probe ({data}, {size} px, train → val)",
        "",
        header,
        "|" + "---|" * (2 + 2 * len(tasks)),
    ]
    for (backbone, method), row in wide.iterrows():
        cells = " | ".join(f"{row[('top1', t)]:.3f} | {row[('f1', t)]:.3f}" for t in tasks)
        lines.append(f"| {backbone} | {method} | {cells} |")
    counts = table.groupby("task")[["n_train", "n_val"]].first()
    lines += ["", "Labeled samples (train / val): "]
    lines[-1] += ", ".join(
        f"{t} {counts.loc[t, 'n_train']} / {counts.loc[t, 'n_val']}" for t in tasks
    )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ssl_mt.probe", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("backbones", nargs="+", metavar="BACKBONE")
    parser.add_argument("--data", type=Path, required=True, help="dataset root (labels.csv)")
    parser.add_argument("--out", type=Path, required=True, help="folder for probe.csv/md")
    parser.add_argument("--size", type=int, default=96, help="image side in pixels")
    parser.add_argument("--tasks", default="default", help="conf/tasks option or YAML file")
    parser.add_argument("--k", type=int, default=20, help="kNN neighbours")
    parser.add_argument("--c", type=float, default=1.0, help="inverse L2 strength of the probe")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    add_trust_argument(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        table = run_probe(
            args.backbones,
            args.data,
            args.out,
            size=args.size,
            tasks=args.tasks,
            k=args.k,
            c=args.c,
            batch_size=args.batch_size,
            num_workers=args.workers,
            trust=args.trust_checkpoint,
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print((args.out / "probe.md").read_text())
    log.info("wrote %s and %s", args.out / "probe.csv", args.out / "probe.md")
    return 0 if len(table) else 1


if __name__ == "__main__":
    freeze_heap_at_exit()
    sys.exit(main())
