"""What the benchmark measures: its rows and settings, with device-dependent defaults."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

STEP_ROWS = ("ceiling", "simclr", "simclr_e2e", "unet", "mt", "mt_e2e")
DATA_ROWS = ("data_ssl", "data_mt")
# Decoding alone at each JPEG scale, once for the dataset (not per size): the bound of the
# data rows' reduced-over-full ratio.
DECODE_ROW = "decode"
ROW_NAMES = (*STEP_ROWS, *DATA_ROWS, DECODE_ROW)
ONLY_CHOICES = (*STEP_ROWS, "data", *DATA_ROWS, DECODE_ROW)
PRECISIONS = ("bf16-mixed", "16-mixed", "32-true")
DECODINGS = ("reduced", "full")
# Which measured step each data pipeline has to feed (first one measured wins).
FEEDS = {"data_ssl": ("simclr", "ceiling"), "data_mt": ("mt", "ceiling")}


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
        only: Rows to measure (``data`` = both data rows and the decode rows).
        optim: Optimiser config of ``conf/optim`` (AdamW, fused on CUDA).
        ssl_augment: SSL view preset of ``conf/augment`` (``skin`` as in pretraining).
        tasks: Task config of ``conf/tasks`` (name or path).
        weighting: Loss weighting of ``conf/weighting``.
        cudnn_benchmark: Set ``torch.backends.cudnn.benchmark``.
        threads: ``torch.set_num_threads`` for the main process (None: torch's default).
        seed: Random seed.
        progress: Print a line per row to stderr.
        decoding: JPEG decoding of the data rows, each measured: ``reduced`` (the smallest
            DCT scale the crop allows, as training does) and/or ``full``. The end-to-end rows
            use the first.
        camera: Generate this many camera-size photos (``camera_size``, JPEG, with masks)
            instead of the small synthetic dataset (ignored with ``data``).
        camera_size: Width and height of the generated photos.
        camera_noise: Gaussian noise (grey levels) of the generated photos: it sets their
            JPEG size, and so the entropy decoding that no DCT scale avoids.
        rounds: The data rows are timed in this many rounds, each decoding in turn within a
            round, and their times summed: a drift of the machine's speed (a shared or
            throttled CPU) then weighs on reduced and full decoding alike, so their ratio
            holds.
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
    decoding: list[str] | None = None
    camera: int = 0
    camera_size: tuple[int, int] = (4000, 3000)
    camera_noise: float = 4.0
    rounds: int = 1

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
        s.decoding = list(dict.fromkeys(s.decoding or DECODINGS))
        s.camera_size = (int(s.camera_size[0]), int(s.camera_size[1]))
        _validate(s)
        return s


def _validate(s: BenchSettings) -> None:
    if s.precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {PRECISIONS}, got {s.precision!r}")
    if any(x < 32 for x in s.sizes):
        raise ValueError(f"--sizes must be >= 32 pixels, got {s.sizes}")
    needs_32 = {"mt", "mt_e2e", "unet", "data_mt"} & set(s.only)
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
    unknown = [d for d in s.decoding if d not in DECODINGS]
    if unknown:
        raise ValueError(f"--decoding: unknown {unknown}; choose from {list(DECODINGS)}")
    if s.camera < 0 or min(s.camera_size) < 32 or s.camera_noise < 0:
        raise ValueError(
            "--camera must be >= 0, --camera-size >= 32 px and --camera-noise >= 0, got "
            f"{s.camera} / {s.camera_size} / {s.camera_noise}"
        )
    if s.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {s.rounds}")
    if s.steps < 1 or s.warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {s.steps} / {s.warmup}")


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
        chosen |= {*DATA_ROWS, DECODE_ROW}
    return [r for r in ROW_NAMES if r in chosen]
