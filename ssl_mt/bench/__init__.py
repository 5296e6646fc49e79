"""Throughput against the backbone's ceiling: ``python -m ssl_mt.bench [options]``.

For each resolution, on the current device, measures training steps built from the project's
own code (no Trainer) and prints a table (``--out FILE.json`` writes the same as JSON):

- ``ceiling``: the bare timm backbone (:func:`~ssl_mt.models.backbone.create_backbone`) plus a
  linear layer, cross-entropy on random labels, backward, optimiser step, on device tensors;
- ``simclr``: :meth:`SimCLRModule.ssl_step <ssl_mt.models.simclr.SimCLRModule.ssl_step>`
  (backbone + projector + NT-Xent over two views), backward, step, on device tensors;
- ``simclr_e2e``: the same step fed by the real :class:`~ssl_mt.data.datamodules.SSLDataModule`
  loader (decoding, two augmented views, host→device copy with ``non_blocking``);
- ``unet``: a plain segmentation_models_pytorch U-Net with the same encoder, decoder widths
  and segmentation outputs, BCE loss, the same optimiser: the multi-task step's ceiling;
- ``mt``: :class:`~ssl_mt.models.multitask.MultiTaskModule` forward, masked task losses,
  weighting, backward, step, with random masks, labels and presence flags on the device;
- ``mt_e2e``: the same step fed by the real :class:`~ssl_mt.data.datamodules.MultiTaskDataModule`;
- ``data_ssl`` / ``data_mt``: the two loaders alone (no model), per worker count, and the
  worker count that keeps the measured step fed: ceil(step images/s ÷ images/s per worker),
  with reduced and with full JPEG decoding (``--decoding``) and their ratio;
- ``decode``: decoding alone of the training JPEGs at full, 1/2, 1/4 and 1/8 scale, one
  thread (:mod:`ssl_mt.bench.decoding`): the bound of the data rows' reduced/full ratio.

Every workload is built as the apps build it (:mod:`ssl_mt.bench.workloads`: the composed
``pretrain`` / ``finetune`` config, their ``build_module`` and datamodule). ``--camera N``
generates N camera-size photos (12 MP JPEGs with PNG masks) to read from.

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
    python -m ssl_mt.bench --only data --sizes 224 384 --batch-sizes 4 --camera 16 --markdown
"""

from ssl_mt.bench.cli import main, parse_args, settings_from_args
from ssl_mt.bench.measurement import Bench, run_bench
from ssl_mt.bench.report import format_table
from ssl_mt.bench.rows import Row, fill_ratios
from ssl_mt.bench.settings import (
    DATA_ROWS,
    DECODE_ROW,
    DECODINGS,
    ONLY_CHOICES,
    ROW_NAMES,
    STEP_ROWS,
    BenchSettings,
    parse_only,
)

__all__ = [
    "DATA_ROWS",
    "DECODE_ROW",
    "DECODINGS",
    "ONLY_CHOICES",
    "ROW_NAMES",
    "STEP_ROWS",
    "Bench",
    "BenchSettings",
    "Row",
    "fill_ratios",
    "format_table",
    "main",
    "parse_args",
    "parse_only",
    "run_bench",
    "settings_from_args",
]
