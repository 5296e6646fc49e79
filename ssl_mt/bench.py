"""Throughput against the backbone's ceiling: ``python -m ssl_mt.bench [options]``.

For each resolution, on the current device, measures training steps built from the project's
own code (no Trainer) and prints a table (``--out FILE.json`` writes the same as JSON):

- ``ceiling``: the bare timm backbone (:func:`~ssl_mt.models.backbone.create_backbone`) plus a
  linear layer, cross-entropy on random labels, backward, optimiser step, on device tensors;
- ``simclr``: :meth:`SimCLRModule.ssl_step <ssl_mt.models.simclr.SimCLRModule.ssl_step>`
  (backbone + projector + NT-Xent over two views), backward, step, on device tensors;
- ``simclr_e2e``: the same step fed by the real :class:`~ssl_mt.data.datamodules.SSLDataModule`
  loader (decoding, two augmented views, host→device copy with ``non_blocking``);
- ``mt``: :class:`~ssl_mt.models.multitask.MultiTaskModule` forward, masked task losses,
  weighting, backward, step, with random masks, labels and presence flags on the device;
- ``mt_e2e``: the same step fed by the real :class:`~ssl_mt.data.datamodules.MultiTaskDataModule`;
- ``data_ssl`` / ``data_mt``: the two loaders alone (no model), per worker count, and the
  worker count that keeps the measured step fed: ceil(step images/s ÷ images/s per worker).

Images/s count every image the backbone sees: a SimCLR step of batch B is 2 × B images (both
views), and the SSL data pipeline is counted in views too. Ratios are against the ceiling at
the same resolution, precision, memory format and compile mode. Timed loops never call
``.item()``; on CUDA the device is synchronised only at the ends of a timed window (CUDA
events), and peak memory is ``torch.cuda.max_memory_allocated`` since the row's start. On
the CPU, peak memory is the process's peak resident set size above its size before the row's
model was built (data workers not included).

Examples::

    python -m ssl_mt.bench                                   # quick CPU profile, ~1 minute
    python -m ssl_mt.bench --device cuda --sizes 224 384 --batch-sizes 128 64 --compile
    python -m ssl_mt.bench --only data --sizes 224 384 --workers 1 2 --data DIR --out d.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn

from ssl_mt.config import group_options, load_group, load_tasks_config
from ssl_mt.data.datamodules import MultiTaskDataModule, SSLDataModule
from ssl_mt.data.manifest import MANIFEST_NAME
from ssl_mt.data.synthetic import generate_dataset
from ssl_mt.models.backbone import create_backbone
from ssl_mt.models.multitask import MultiTaskModule
from ssl_mt.models.simclr import SimCLRModule
from ssl_mt.optim import build_optimizer, decay_groups
from ssl_mt.runner import backbone_kwargs, plain
from ssl_mt.tasks import TaskSpec, parse_tasks

STEP_ROWS = ("ceiling", "simclr", "simclr_e2e", "mt", "mt_e2e")
DATA_ROWS = ("data_ssl", "data_mt")
ROW_NAMES = (*STEP_ROWS, *DATA_ROWS)
ONLY_CHOICES = (*STEP_ROWS, "data", *DATA_ROWS)
PRECISIONS = ("bf16-mixed", "16-mixed", "32-true")
# Which measured step each data pipeline has to feed (first one measured wins).
FEEDS = {"data_ssl": ("simclr", "ceiling"), "data_mt": ("mt", "ceiling")}
SYNTHETIC_VAL_FRACTION = 0.15
SYNTHETIC_MAX_IMAGES = 4096
CEILING_CLASSES = 1000


# ---------------------------------------------------------------------------------------------
# Settings and results
# ---------------------------------------------------------------------------------------------
@dataclass
class BenchSettings:
    """What to measure. ``None`` fields get device-dependent defaults in :meth:`resolved`.

    Attributes:
        backbone: timm model name (efficientnet_b4 on CUDA, test_efficientnet on the CPU).
        sizes: Square resolutions.
        batch_sizes: One per size (or one for all): images per step; SimCLR pairs per step.
        workers: DataLoader worker counts: the data rows are measured at each, the
            end-to-end rows use the largest.
        precision: ``bf16-mixed`` / ``16-mixed`` (autocast) or ``32-true``.
        compile: ``torch.compile(dynamic=False)`` as the apps do it (backbone for the ceiling
            and SimCLR, the whole network for multi-task).
        channels_last: NHWC memory format (on by default on CUDA, off on the CPU).
        steps: Timed steps per row (timed batches for the data rows).
        warmup: Untimed steps before timing (at least 3 with ``compile``).
        data: Dataset root (``labels.csv``; a plain image folder serves the SSL rows only).
            None: a synthetic dataset is generated into a temporary directory.
        synthetic_n: Images of the generated dataset (default: enough for one pass).
        synthetic_size: Side of the generated images (default: the largest size).
        device: ``auto``, ``cpu`` or ``cuda``.
        only: Rows to measure (``data`` = both data rows).
        optim: Optimiser config of ``conf/optim`` (AdamW, fused on CUDA).
        ssl_augment: SSL view preset of ``conf/augment`` (``skin`` as in pretraining).
        tasks: Task config of ``conf/tasks`` (name or path).
        weighting: Loss weighting of ``conf/weighting``.
        cudnn_benchmark: Set ``torch.backends.cudnn.benchmark``.
        threads: ``torch.set_num_threads`` for the main process (None: torch's default).
        seed: Random seed.
        progress: Print a line per row to stderr.
    """

    backbone: str | None = None
    sizes: list[int] | None = None
    batch_sizes: list[int] | None = None
    workers: list[int] | None = None
    precision: str | None = None
    compile: bool = False
    channels_last: bool | None = None
    steps: int | None = None
    warmup: int | None = None
    data: str | Path | None = None
    synthetic_n: int | None = None
    synthetic_size: int | None = None
    device: str = "auto"
    only: list[str] | None = None
    optim: str = "adamw"
    ssl_augment: str = "skin"
    tasks: str = "default"
    weighting: str = "fixed"
    cudnn_benchmark: bool = False
    threads: int | None = None
    seed: int = 0
    progress: bool = True

    def resolved(self) -> BenchSettings:
        """A copy with every default filled in for the chosen device, validated."""
        device = resolve_device(self.device)
        cuda = device.type == "cuda"
        s = BenchSettings(**{**self.__dict__})
        s.device = device.type
        s.backbone = s.backbone or ("efficientnet_b4" if cuda else "test_efficientnet")
        s.sizes = [int(x) for x in (s.sizes or ([224, 384] if cuda else [64, 96]))]
        if not s.batch_sizes:
            s.batch_sizes = [(128 if x <= 256 else 64) if cuda else 16 for x in s.sizes]
        elif len(s.batch_sizes) == 1:
            s.batch_sizes = [int(s.batch_sizes[0])] * len(s.sizes)
        s.batch_sizes = [int(b) for b in s.batch_sizes]
        if len(s.batch_sizes) != len(s.sizes):
            raise ValueError(
                f"--batch-sizes needs one value per size ({len(s.sizes)}) or a single value, "
                f"got {s.batch_sizes}"
            )
        if s.workers is None:
            s.workers = [min(8, max(1, (os.cpu_count() or 2) - 1))] if cuda else [1]
        s.workers = sorted({int(w) for w in s.workers})
        s.precision = s.precision or (default_precision() if cuda else "32-true")
        if s.channels_last is None:
            s.channels_last = cuda
        s.steps = int(s.steps if s.steps is not None else (20 if cuda else 4))
        s.warmup = int(s.warmup if s.warmup is not None else (5 if cuda else 1))
        if s.compile:
            s.warmup = max(s.warmup, 3)
        s.only = parse_only(s.only)
        _validate(s)
        return s


def _validate(s: BenchSettings) -> None:
    if s.precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {PRECISIONS}, got {s.precision!r}")
    if any(x < 32 for x in s.sizes):
        raise ValueError(f"--sizes must be >= 32 pixels, got {s.sizes}")
    needs_32 = {"mt", "mt_e2e", "data_mt"} & set(s.only)
    if needs_32 and any(x % 32 for x in s.sizes):
        raise ValueError(
            f"--sizes {s.sizes}: the multi-task rows need multiples of 32 (the encoder's stride)"
        )
    if any(b < 2 for b in s.batch_sizes):
        raise ValueError(
            f"--batch-sizes must be >= 2 (SimCLR needs negatives), got {s.batch_sizes}"
        )
    if any(w < 0 for w in s.workers):
        raise ValueError(f"--workers must be >= 0, got {s.workers}")
    if s.threads is not None and s.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {s.threads}")
    if s.steps < 1 or s.warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {s.steps} / {s.warmup}")


@dataclass
class Row:
    """One line of the table.

    ``images_per_s`` counts every image through the backbone (both SimCLR views; views for
    ``data_ssl``). ``ratio`` is ``images_per_s`` over the ceiling's at the same size.
    ``data_wait`` is the share of the timed wall time spent blocked in ``next(loader)``.
    """

    row: str
    size: int
    batch: int
    images_per_step: int
    images_per_s: float
    step_ms: float
    steps: int
    ratio: float | None = None
    peak_mem_mib: float | None = None
    data_wait: float | None = None
    workers: int | None = None
    images_per_s_per_worker: float | None = None
    workers_needed: int | None = None
    fed_row: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (torch.cuda.is_available())")
    return torch.device(name)


def default_precision() -> str:
    """The trainer's default (``${auto_precision:}``): bf16 autocast where the GPU has it."""
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"


def parse_only(only: Sequence[str] | str | None) -> list[str]:
    """Row names from ``--only`` values (comma-separated, repeatable); ``data`` = both."""
    if not only:
        return list(ROW_NAMES)
    items = [only] if isinstance(only, str) else list(only)
    names = [x.strip() for item in items for x in str(item).split(",") if x.strip()]
    unknown = [x for x in names if x not in ONLY_CHOICES]
    if unknown:
        raise ValueError(f"--only: unknown row(s) {unknown}; choose from {list(ONLY_CHOICES)}")
    chosen = set(names)
    if "data" in chosen:
        chosen |= set(DATA_ROWS)
    return [r for r in ROW_NAMES if r in chosen]


# ---------------------------------------------------------------------------------------------
# Configuration through the project's own config files
# ---------------------------------------------------------------------------------------------
def _conf(group: str, name: str) -> dict[str, Any]:
    """A config option as the apps compose it (interpolations resolved)."""
    return plain(load_group(group, name))


def backbone_config(name: str) -> dict[str, Any]:
    """The ``conf/backbone`` entry of a timm model (its drop path, decoder widths), offline.

    A model without an entry gets plain defaults (no drop path, smp's decoder widths).
    """
    for option in group_options("backbone"):
        cfg = _conf("backbone", option)
        if cfg.get("name") == name:
            break
    else:
        cfg = {"name": name, "grad_checkpointing": False, "drop_path_rate": 0.0}
    return {**cfg, "pretrained": False, "weights": None}


# ---------------------------------------------------------------------------------------------
# Device helpers: precision, timing, memory
# ---------------------------------------------------------------------------------------------
class Precision:
    """Autocast context and backward/step as Lightning's precision plugins do them."""

    def __init__(self, name: str, device: torch.device) -> None:
        self.name = name
        self.device = device
        self.dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(name)
        # fp16 needs loss scaling; GradScaler.step synchronises (inherent to fp16 training).
        self.scaler = torch.amp.GradScaler(device.type) if name == "16-mixed" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward_step(self, loss: Tensor, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled so far in this process."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class WindowTimer:
    """Seconds of a timed window: CUDA events on the GPU, ``perf_counter`` on the CPU.

    ``new_graphs`` counts graphs compiled inside the window (should be 0: compilation
    belongs in the warmup).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def __enter__(self) -> WindowTimer:
        synchronize(self.device)  # nothing queued before the window counts in it
        self._graphs = compiled_graphs()
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self._end.record()
            self._end.synchronize()
            self.wall = time.perf_counter() - self._t0
            self.device_s = self._start.elapsed_time(self._end) / 1000.0
        else:
            self.wall = self.device_s = time.perf_counter() - self._t0
        self.new_graphs = compiled_graphs() - self._graphs


def _vm_hwm_bytes() -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(r"VmHWM:\s+(\d+)\s+kB", status)
    return int(match.group(1)) * 1024 if match else None


def _rss_bytes() -> int | None:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a dependency
        return None
    return int(psutil.Process().memory_info().rss)


class PeakMemory:
    """Peak device memory of a row (CUDA) or peak RSS above a baseline (CPU), in MiB.

    On Linux the kernel's peak-RSS counter is reset through ``/proc/self/clear_refs``; where
    that is not allowed a thread samples the RSS every 5 ms.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()
        self._sampled = 0
        self._hwm = False

    def host_baseline(self) -> int | None:
        """The RSS now (call before building a row's model)."""
        return None if self.device.type == "cuda" else _rss_bytes()

    def start(self) -> None:
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self._hwm = False
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")
            self._hwm = _vm_hwm_bytes() is not None
        if not self._hwm and _rss_bytes() is not None:
            self._stop.clear()
            self._sampled = _rss_bytes() or 0
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._sampled = max(self._sampled, _rss_bytes() or 0)

    def peak_mib(self, baseline: int | None) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        peak = None
        if self._hwm:
            peak = _vm_hwm_bytes()
        elif self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            self._sampler = None
            peak = max(self._sampled, _rss_bytes() or 0)
        if peak is None or baseline is None:
            return None
        return max(0.0, (peak - baseline) / 2**20)


def to_device(obj: Any, device: torch.device) -> Any:
    """Tensors of a (nested) batch on ``device``; asynchronous from pinned memory."""
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


# ---------------------------------------------------------------------------------------------
# Models and steps (the project's modules, driven without a Trainer)
# ---------------------------------------------------------------------------------------------
@dataclass
class Workbench:
    """A model, its optimiser and its step function; shared by a device row and its e2e row."""

    kind: str
    module: nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[Any], None]
    host_baseline: int | None


def _optimizer(module: nn.Module, optim_cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    groups = decay_groups(module, float(optim_cfg.get("weight_decay", 0.0)), tag="all")
    return build_optimizer(groups, optim_cfg, float(optim_cfg["base_lr"]))


def build_ceiling(s: BenchSettings, device: torch.device, memory: PeakMemory) -> Workbench:
    """The bare backbone + a linear layer; cross-entropy on random labels."""
    baseline = memory.host_baseline()
    backbone = create_backbone(**backbone_kwargs(backbone_config(s.backbone)))
    model = nn.ModuleDict(
        {"backbone": backbone, "head": nn.Linear(backbone.num_features, CEILING_CLASSES)}
    ).to(device)
    model.train()
    if s.channels_last:
        model.to(memory_format=torch.channels_last)
    if s.compile:
        backbone.compile(dynamic=False)
    optimizer = _optimizer(model, _conf("optim", s.optim))
    precision = Precision(s.precision, device)

    def step(batch: tuple[Tensor, Tensor]) -> None:
        images, labels = batch
        with precision.autocast():
            logits = model["head"](model["backbone"](images))
            loss = F.cross_entropy(logits.float(), labels)
        precision.backward_step(loss, optimizer)

    return Workbench("ceiling", model, optimizer, step, baseline)


def build_simclr(s: BenchSettings, device: torch.device, memory: PeakMemory) -> Workbench:
    """:class:`SimCLRModule` as ``conf/method/simclr.yaml`` builds it; step = ``ssl_step``."""
    baseline = memory.host_baseline()
    method = _conf("method", "simclr")
    method.pop("_target_", None)
    optim_cfg = _conf("optim", s.optim)
    module = SimCLRModule(
        **method,
        backbone=backbone_kwargs(backbone_config(s.backbone)),
        optim=optim_cfg,
        channels_last=s.channels_last,
        compile=s.compile,
        image_size=max(s.sizes),
    ).to(device)
    module.configure_model()  # channels_last + backbone.compile(dynamic=False), as in fit
    module.train()
    optimizer = _optimizer(module, optim_cfg)
    precision = Precision(s.precision, device)

    def step(views: Sequence[Tensor]) -> None:
        with precision.autocast():
            loss, _, _ = module.ssl_step(views)
        precision.backward_step(loss, optimizer)

    return Workbench("simclr", module, optimizer, step, baseline)


def build_multitask(
    s: BenchSettings, device: torch.device, memory: PeakMemory, tasks_cfg: Mapping[str, Any]
) -> Workbench:
    """:class:`MultiTaskModule` as ``conf/model/unet.yaml`` builds it; the training step's
    forward, masked task losses and weighting, without logging."""
    baseline = memory.host_baseline()
    backbone = backbone_config(s.backbone)
    # conf/model/unet.yaml takes its decoder widths from the backbone entry (interpolation).
    unet = load_group("model", "unet")
    model_cfg = {
        "arch": str(unet.get("arch", "unet")),
        "head_dropout": float(unet.get("head_dropout", 0.2)),
        "decoder_channels": backbone.pop("decoder_channels", None),
    }
    optim_cfg = _conf("optim", s.optim)
    module = MultiTaskModule(
        tasks=tasks_cfg,
        backbone=backbone,
        optim=optim_cfg,
        weighting=_conf("weighting", s.weighting),
        eval_sizes=list(s.sizes),
        channels_last=s.channels_last,
        compile=s.compile,
        **model_cfg,
    ).to(device)
    module.configure_model()  # channels_last + net.compile(dynamic=False), as in fit
    module.train()
    optimizer = _optimizer(module, optim_cfg)
    precision = Precision(s.precision, device)

    def step(batch: Mapping[str, Any]) -> None:
        with precision.autocast():
            outputs = module(batch["image"])
            losses = module.task_losses(outputs, batch)
            present = {name: flags.any() for name, flags in batch["present"].items()}
            total, _ = module.weighting(losses, present)
        precision.backward_step(total, optimizer)

    return Workbench("mt", module, optimizer, step, baseline)


def random_mt_batch(
    tasks: Sequence[TaskSpec], batch: int, size: int, device: torch.device
) -> dict[str, Any]:
    """A multi-task batch on the device: images, masks, labels, ~80% presence per task."""
    image = torch.randn(batch, 3, size, size, device=device)
    target: dict[str, Tensor] = {}
    present: dict[str, Tensor] = {}
    for task in tasks:
        flags = torch.rand(batch, device=device) < 0.8
        present[task.name] = flags
        if task.is_segmentation:
            target[task.name] = (torch.rand(batch, 1, size, size, device=device) < 0.3).float()
        else:
            labels = torch.randint(task.num_classes, (batch,), device=device)
            target[task.name] = torch.where(flags, labels, torch.full_like(labels, -1))
    return {"image": image, "target": target, "present": present}


# ---------------------------------------------------------------------------------------------
# Loaders (the project's datamodules)
# ---------------------------------------------------------------------------------------------
def ssl_loader(s: BenchSettings, root: Path, size: int, batch: int, workers: int, pin: bool):
    dm = SSLDataModule(
        root=str(root),
        stages=[{"size": size, "epochs": 1, "batch_size": batch}],
        eval_sizes=[size],
        augment=_conf("augment", s.ssl_augment),
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=True,
        seed=s.seed,
    )
    dm.setup("fit")
    return dm.train_dataloader()


def mt_loader(
    s: BenchSettings,
    root: Path,
    tasks_cfg: Mapping[str, Any],
    size: int,
    batch: int,
    workers: int,
    pin: bool,
):
    if not (root / MANIFEST_NAME).is_file():
        raise ValueError(
            f"{root}: the multi-task rows need a labelled dataset ({MANIFEST_NAME}); "
            "drop --data to use a synthetic one, or pick rows with --only"
        )
    dm = MultiTaskDataModule(
        root=str(root),
        tasks=tasks_cfg,
        stages=[{"size": size, "epochs": 1, "batch_size": batch}],
        eval_sizes=[size],
        eval_batch_size=batch,
        augment=_conf("augment", "finetune"),
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=True,
        seed=s.seed,
    )
    dm.setup("fit")
    return dm.train_dataloader()


class BatchStream:
    """Endless batches of a DataLoader, epoch after epoch (``set_epoch`` as Lightning does).

    ``position`` is the index of the last batch within its epoch.
    """

    def __init__(self, loader) -> None:
        self.loader = loader
        self.epoch = 0
        self.position = -1
        self._it: Iterator | None = None

    def next(self) -> Any:
        for _ in range(2):
            if self._it is None:
                self.loader.sampler.set_epoch(self.epoch)
                self._it = iter(self.loader)
                self.position = -1
            try:
                batch = next(self._it)
            except StopIteration:
                self._it = None
                self.epoch += 1
                continue
            self.position += 1
            return batch
        raise RuntimeError("the loader yields no batch: dataset smaller than one batch?")

    def close(self) -> None:
        self._it = None
        self.loader = None


def batch_images(batch: Mapping[str, Any]) -> int:
    if "views" in batch:
        return sum(int(v.shape[0]) for v in batch["views"])
    image = batch.get("image")
    return int(image.shape[0]) if isinstance(image, Tensor) else 0


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------
def time_device_steps(
    step: Callable[[Any], None], batch: Any, s: BenchSettings, device: torch.device
) -> WindowTimer:
    """The window of ``s.steps`` steps on one device batch, after ``s.warmup`` untimed ones."""
    for _ in range(s.warmup):
        step(batch)
    with WindowTimer(device) as timer:
        for _ in range(s.steps):
            step(batch)
    return timer


def time_e2e_steps(
    step: Callable[[Any], None],
    stream: BatchStream,
    prepare: Callable[[Any], Any],
    s: BenchSettings,
    device: torch.device,
) -> tuple[WindowTimer, float]:
    """(window, seconds blocked in ``next(loader)``) of ``s.steps`` loader-fed steps."""
    for _ in range(s.warmup):
        step(prepare(to_device(stream.next(), device)))
    waited = 0.0
    with WindowTimer(device) as timer:
        for _ in range(s.steps):
            t0 = time.perf_counter()
            batch = stream.next()
            waited += time.perf_counter() - t0
            step(prepare(to_device(batch, device)))
    return timer, waited


def time_loader(stream: BatchStream, workers: int, timed_batches: int) -> tuple[float, int, int]:
    """Steady-state loading: (seconds, images, batches) over ``timed_batches`` batches.

    The first batches of every epoch (one per worker; the very first one without workers)
    are not timed: they carry the workers' start, not their throughput.
    """
    seconds, images, batches = 0.0, 0, 0
    per_epoch = len(stream.loader)
    while batches < timed_batches:
        t0 = time.perf_counter()
        batch = stream.next()
        elapsed = time.perf_counter() - t0
        skip = workers if workers > 0 else int(stream.epoch == 0)
        if stream.position < min(skip, per_epoch - 1):
            continue
        seconds += elapsed
        images += batch_images(batch)
        batches += 1
    return seconds, images, batches


class Bench:
    """Runs the rows of :class:`BenchSettings` (already :meth:`~BenchSettings.resolved`)."""

    def __init__(self, settings: BenchSettings, data_root: Path | None) -> None:
        self.s = settings
        self.device = torch.device(settings.device)
        self.memory = PeakMemory(self.device)
        self.data_root = data_root
        self.tasks_cfg = OmegaConf.to_container(load_tasks_config(settings.tasks), resolve=True)
        self.tasks = parse_tasks(self.tasks_cfg)
        self.rows: list[Row] = []

    def log(self, message: str) -> None:
        if self.s.progress:
            print(f"[bench] {message}", file=sys.stderr, flush=True)

    def run(self) -> list[Row]:
        for size, batch in zip(self.s.sizes, self.s.batch_sizes, strict=True):
            self._size(size, batch)
        fill_ratios(self.rows)
        return self.rows

    def _release(self) -> None:
        """Frees what the previous model left (its references are gone already)."""
        gc.collect()
        if self.s.compile:
            torch._dynamo.reset()  # the next model compiles its own graphs
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _size(self, size: int, batch: int) -> None:
        only = set(self.s.only)
        if "ceiling" in only:
            self.log(f"{size}px ceiling (batch {batch})")
            bench = build_ceiling(self.s, self.device, self.memory)
            memory_format = torch.channels_last if self.s.channels_last else torch.contiguous_format
            images = torch.randn(batch, 3, size, size, device=self.device).contiguous(
                memory_format=memory_format
            )
            labels = torch.randint(CEILING_CLASSES, (batch,), device=self.device)
            self._device_row("ceiling", bench, (images, labels), size, batch, batch)
            del bench, images, labels
            self._release()
        if {"simclr", "simclr_e2e"} & only:
            bench = build_simclr(self.s, self.device, self.memory)
            if "simclr" in only:
                self.log(f"{size}px simclr (batch {batch} pairs)")
                views = [torch.randn(batch, 3, size, size, device=self.device) for _ in range(2)]
                self._device_row("simclr", bench, views, size, batch, 2 * batch)
                del views
            if "simclr_e2e" in only:
                workers = max(self.s.workers)
                self.log(f"{size}px simclr_e2e (batch {batch} pairs, {workers} workers)")
                loader = ssl_loader(
                    self.s, self._root(), size, batch, workers, self.device.type == "cuda"
                )
                self._e2e_row(
                    "simclr_e2e", bench, loader, lambda b: b["views"], size, batch, 2 * batch
                )
                del loader
            del bench
            self._release()
        if {"mt", "mt_e2e"} & only:
            bench = build_multitask(self.s, self.device, self.memory, self.tasks_cfg)
            if "mt" in only:
                self.log(f"{size}px mt (batch {batch})")
                data = random_mt_batch(self.tasks, batch, size, self.device)
                self._device_row("mt", bench, data, size, batch, batch)
                del data
            if "mt_e2e" in only:
                workers = max(self.s.workers)
                self.log(f"{size}px mt_e2e (batch {batch}, {workers} workers)")
                loader = mt_loader(
                    self.s,
                    self._root(),
                    self.tasks_cfg,
                    size,
                    batch,
                    workers,
                    self.device.type == "cuda",
                )
                self._e2e_row("mt_e2e", bench, loader, lambda b: b, size, batch, batch)
                del loader
            del bench
            self._release()
        for name in DATA_ROWS:
            if name in only:
                for workers in self.s.workers:
                    self.log(f"{size}px {name} (batch {batch}, {workers} workers)")
                    self._data_row(name, size, batch, workers)

    def _root(self) -> Path:
        if self.data_root is None:
            raise RuntimeError("no dataset: end-to-end and data rows need one")
        return self.data_root

    def _device_row(
        self, name: str, bench: Workbench, batch_data: Any, size: int, batch: int, images: int
    ) -> None:
        self.memory.start()
        timer = time_device_steps(bench.step, batch_data, self.s, self.device)
        row = self._timed_row(
            name, size, batch, images, timer.device_s, self.memory.peak_mib(bench.host_baseline)
        )
        self._add(row, timer)

    def _timed_row(
        self, name: str, size: int, batch: int, images: int, seconds: float, peak: Any, **extra: Any
    ) -> Row:
        """A table row from the time ``self.s.steps`` steps took."""
        return Row(
            row=name,
            size=size,
            batch=batch,
            images_per_step=images,
            images_per_s=images * self.s.steps / seconds,
            step_ms=1000.0 * seconds / self.s.steps,
            steps=self.s.steps,
            peak_mem_mib=peak,
            **extra,
        )

    def _e2e_row(
        self,
        name: str,
        bench: Workbench,
        loader,
        prepare: Callable[[Any], Any],
        size: int,
        batch: int,
        images: int,
    ) -> None:
        stream = BatchStream(loader)
        try:
            self.memory.start()
            timer, waited = time_e2e_steps(bench.step, stream, prepare, self.s, self.device)
            peak = self.memory.peak_mib(bench.host_baseline)
        finally:
            stream.close()
            del loader
            gc.collect()  # the loader's workers end with it (cheap: see run_bench)
        wall = timer.wall
        row = self._timed_row(
            name,
            size,
            batch,
            images,
            wall,
            peak,
            data_wait=waited / wall,
            workers=max(self.s.workers),
        )
        self._add(row, timer)

    def _add(self, row: Row, timer: WindowTimer) -> None:
        if timer.new_graphs:
            row.extra["graphs_compiled_while_timed"] = timer.new_graphs
            self.log(
                f"warning: {row.row} at {row.size}px compiled {timer.new_graphs} graph(s) inside "
                "the timed window; raise --warmup"
            )
        self.rows.append(row)

    def _data_row(self, name: str, size: int, batch: int, workers: int) -> None:
        pin = self.device.type == "cuda"
        if name == "data_ssl":
            loader = ssl_loader(self.s, self._root(), size, batch, workers, pin)
        else:
            loader = mt_loader(self.s, self._root(), self.tasks_cfg, size, batch, workers, pin)
        stream = BatchStream(loader)
        try:
            seconds, images, batches = time_loader(stream, workers, self.s.steps)
        finally:
            stream.close()
            del loader
            gc.collect()  # the loader's workers end with it (cheap: see run_bench)
        rate = images / seconds
        per_step = images // max(1, batches)
        row = Row(
            row=name,
            size=size,
            batch=batch,
            images_per_step=per_step,
            images_per_s=rate,
            step_ms=1000.0 * seconds / batches,
            steps=batches,
            workers=workers,
            images_per_s_per_worker=rate / max(1, workers),
        )
        if name == "data_ssl":
            row.extra["pairs_per_s"] = rate / 2
            row.extra["pairs_per_s_per_worker"] = rate / 2 / max(1, workers)
        self.rows.append(row)


def fill_ratios(rows: list[Row]) -> None:
    """Ratios to the ceiling and, for data rows, the workers that keep the step fed."""
    by_key = {(r.row, r.size): r for r in rows}
    for r in rows:
        if r.row in STEP_ROWS:
            ceiling = by_key.get(("ceiling", r.size))
            if ceiling is not None and ceiling.images_per_s > 0:
                r.ratio = r.images_per_s / ceiling.images_per_s
        elif r.row in FEEDS and r.images_per_s_per_worker:
            for fed in FEEDS[r.row]:
                step = by_key.get((fed, r.size))
                if step is not None:
                    r.fed_row = fed
                    r.workers_needed = math.ceil(step.images_per_s / r.images_per_s_per_worker)
                    break


# ---------------------------------------------------------------------------------------------
# Dataset, metadata, entry points
# ---------------------------------------------------------------------------------------------
def synthetic_count(s: BenchSettings) -> int:
    """Images for one pass of the longest row (warmup + steps) through the train split."""
    needed = max(b * (s.warmup + s.steps + max(s.workers) + 1) for b in s.batch_sizes)
    return min(SYNTHETIC_MAX_IMAGES, math.ceil(needed / (1 - SYNTHETIC_VAL_FRACTION)) + 8)


def environment(s: BenchSettings, data: str) -> dict[str, Any]:
    import timm

    device = torch.device(s.device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine() or "cpu"
    return {
        "device": device.type,
        "device_name": name,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "backbone": s.backbone,
        "precision": s.precision,
        "compile": s.compile,
        "channels_last": s.channels_last,
        "optim": s.optim,
        "ssl_augment": s.ssl_augment,
        "weighting": s.weighting,
        "steps": s.steps,
        "warmup": s.warmup,
        "workers": s.workers,
        "sizes": s.sizes,
        "batch_sizes": s.batch_sizes,
        "data": data,
        "cudnn_benchmark": s.cudnn_benchmark,
        "threads": torch.get_num_threads(),
    }


def run_bench(settings: BenchSettings) -> dict[str, Any]:
    """Measures every requested row; returns ``{"meta": {...}, "rows": [{...}, ...]}``.

    Process-wide settings it changes (threads, cuDNN benchmark, matmul precision) are
    restored afterwards.
    """
    s = settings.resolved()
    saved = (
        torch.get_num_threads(),
        torch.backends.cudnn.benchmark,
        torch.get_float32_matmul_precision(),
    )
    torch.manual_seed(s.seed)
    torch.set_float32_matmul_precision("high")  # as the apps do (TF32 on Ampere+)
    if s.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    # Everything alive now (modules, imports) stays out of the garbage collector's scans:
    # gc.collect between rows then costs milliseconds, not a second.
    gc.freeze()
    try:
        with contextlib.ExitStack() as stack:
            root, data = _dataset(s, stack)
            rows = Bench(s, root).run()
            meta = environment(s, data)
    finally:
        gc.unfreeze()
        torch.set_num_threads(saved[0])
        torch.backends.cudnn.benchmark = saved[1]
        torch.set_float32_matmul_precision(saved[2])
    return {"meta": meta, "rows": [asdict(r) for r in rows]}


def _dataset(s: BenchSettings, stack: contextlib.ExitStack) -> tuple[Path | None, str]:
    """The dataset root the loader rows read (generated into a temporary directory when
    ``--data`` is not given) and its description."""
    if not {"simclr_e2e", "mt_e2e", *DATA_ROWS} & set(s.only):
        return None, "-"
    if s.data is not None:
        root = Path(s.data)
        if not root.is_dir():
            raise FileNotFoundError(f"--data {root}: no such directory")
        return root, str(root)
    n = s.synthetic_n or synthetic_count(s)
    px = s.synthetic_size or max(s.sizes)
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ssl_mt_bench_")))
    if s.progress:
        print(f"[bench] generating {n} synthetic images of {px} px", file=sys.stderr, flush=True)
    root = generate_dataset(
        tmp / "data",
        n=n,
        size=px,
        seed=s.seed,
        val_fraction=SYNTHETIC_VAL_FRACTION,
        workers=0 if n > 64 else 1,  # 0: one process per core
        progress=False,
    )
    return root, f"synthetic: {n} images of {px} px"


# ---------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------
COLUMNS = (
    ("row", "row"),
    ("size", "size"),
    ("batch", "batch"),
    ("images_per_step", "img/step"),
    ("images_per_s", "img/s"),
    ("step_ms", "ms/step"),
    ("ratio", "x ceiling"),
    ("peak_mem_mib", "peak mem"),
    ("data_wait", "data wait"),
    ("workers", "workers"),
    ("images_per_s_per_worker", "img/s/worker"),
    ("workers_needed", "workers needed"),
)


def _rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def _mem(mib: float) -> str:
    return f"{mib / 1024:.1f} GiB" if mib >= 1024 else f"{mib:.0f} MiB"


def _cell(key: str, row: Mapping[str, Any]) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if key in ("images_per_s", "images_per_s_per_worker"):
        return _rate(value)
    if key == "step_ms":
        return f"{value:.1f}"
    if key == "ratio":
        return f"{value:.2f}"
    if key == "peak_mem_mib":
        return _mem(value)
    if key == "data_wait":
        return f"{100 * value:.0f}%"
    if key == "workers_needed":
        return f"{value} ({row.get('fed_row')})"
    return str(value)


def describe(meta: Mapping[str, Any]) -> list[str]:
    memory = (
        "torch.cuda.max_memory_allocated"
        if meta["device"] == "cuda"
        else "peak RSS above the RSS before the row's model was built (main process)"
    )
    return [
        f"ssl_mt bench | device {meta['device']}: {meta['device_name']} | torch {meta['torch']}"
        f" | timm {meta['timm']} | backbone {meta['backbone']}",
        f"precision {meta['precision']} | compile {'on' if meta['compile'] else 'off'}"
        f" | channels_last {'on' if meta['channels_last'] else 'off'} | optim {meta['optim']}"
        f" | {meta['steps']} timed steps after {meta['warmup']} warmup"
        f" | {meta['threads']} torch threads | data: {meta['data']}",
        "img/s counts every image through the backbone: simclr rows 2 x batch per step (both"
        " views), data_ssl counts views; x ceiling = img/s / ceiling img/s at that size;",
        f"peak mem = {memory}; data wait = share of wall time blocked in next(loader);"
        " workers needed = ceil(step img/s / img/s per worker) for the step in brackets.",
    ]


def format_table(result: Mapping[str, Any], markdown: bool = False) -> str:
    """The rows as a fixed-width text table (or a markdown table) under a header."""
    headers = [title for _, title in COLUMNS]
    cells = [[_cell(key, row) for key, _ in COLUMNS] for row in result["rows"]]
    lines = describe(result["meta"])
    if markdown:
        lines = [f"_{line}_  " for line in lines] + [""]
        lines.append("| " + " | ".join(headers) + " |")
        lines.append("|" + "|".join(["---"] * 3 + ["---:"] * (len(headers) - 3)) + "|")
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines)
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]

    def fmt(values: Sequence[str]) -> str:
        parts = [
            v.ljust(w) if i == 0 else v.rjust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    rule = "-" * len(fmt(headers))
    return "\n".join([*lines, rule, fmt(headers), rule, *(fmt(c) for c in cells), rule])


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ssl_mt.bench",
        description="Training throughput of the SimCLR and multi-task steps against the bare "
        "backbone's ceiling, end to end from disk, and of the data pipelines alone.",
        epilog="examples:\n"
        "  python -m ssl_mt.bench                      # quick CPU profile (~1 min)\n"
        "  python -m ssl_mt.bench --device cuda --sizes 224 384 --batch-sizes 128 64 --compile\n"
        "  python -m ssl_mt.bench --only data --sizes 224 384 --workers 1 2 --data DIR\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--backbone", help="timm model (efficientnet_b4 on CUDA, test_efficientnet on CPU)"
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", help="resolutions (224 384 on CUDA, 64 96 on CPU)"
    )
    parser.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        help="per size, or one for all: images per step, SimCLR pairs per step "
        "(128 at <=256 px and 64 above on CUDA; 16 on CPU)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        help="DataLoader workers: data rows at each count, e2e rows at the largest "
        "(min(8, cores-1) on CUDA, 1 on CPU)",
    )
    parser.add_argument(
        "--precision", choices=PRECISIONS, help="bf16-mixed on CUDA, 32-true on CPU"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile(dynamic=False)")
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="NHWC memory format (default: on for CUDA, off for CPU)",
    )
    parser.add_argument("--steps", type=int, help="timed steps per row (20 on CUDA, 4 on CPU)")
    parser.add_argument(
        "--warmup", type=int, help="untimed steps first (5 CUDA, 1 CPU; >=3 compiled)"
    )
    parser.add_argument("--data", help="dataset root (default: a generated synthetic dataset)")
    parser.add_argument("--synthetic-n", type=int, help="images of the generated dataset")
    parser.add_argument("--synthetic-size", type=int, help="side of the generated images (px)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto")
    parser.add_argument(
        "--only",
        action="append",
        help=f"rows, comma-separated (repeatable): {','.join(ONLY_CHOICES)}",
    )
    parser.add_argument("--optim", default="adamw", choices=("adamw", "sgd", "lars"), help="adamw")
    parser.add_argument(
        "--ssl-augment", default="skin", choices=("skin", "simclr"), help="SSL view preset: skin"
    )
    parser.add_argument(
        "--tasks", default="default", help="conf/tasks option or YAML path: default"
    )
    parser.add_argument("--weighting", default="fixed", help="conf/weighting option: fixed")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="cuDNN autotuning")
    parser.add_argument("--threads", type=int, help="torch threads of the main process")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument("--out", help="also write the results as JSON to this file")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    return BenchSettings(
        backbone=args.backbone,
        sizes=args.sizes,
        batch_sizes=args.batch_sizes,
        workers=args.workers,
        precision=args.precision,
        compile=args.compile,
        channels_last=args.channels_last,
        steps=args.steps,
        warmup=args.warmup,
        data=args.data,
        synthetic_n=args.synthetic_n,
        synthetic_size=args.synthetic_size,
        device=args.device,
        only=args.only,
        optim=args.optim,
        ssl_augment=args.ssl_augment,
        tasks=args.tasks,
        weighting=args.weighting,
        cudnn_benchmark=args.cudnn_benchmark,
        threads=args.threads,
        seed=args.seed,
        progress=not args.quiet,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run_bench(settings_from_args(args))
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_table(result, markdown=args.markdown))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
