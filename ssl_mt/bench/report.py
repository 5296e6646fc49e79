"""The results as a text or markdown table under a header that says how they were measured."""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ssl_mt.bench.settings import BenchSettings


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
        "rounds": s.rounds,
        "workers": s.workers,
        "sizes": s.sizes,
        "batch_sizes": s.batch_sizes,
        "data": data,
        "cudnn_benchmark": s.cudnn_benchmark,
        "threads": torch.get_num_threads(),
        "decoding": s.decoding,
    }


COLUMNS = (
    ("row", "row"),
    ("size", "size"),
    ("batch", "batch"),
    ("images_per_step", "img/step"),
    ("images_per_s", "img/s"),
    ("step_ms", "ms/step"),
    ("ratio", "x ceiling"),
    ("vs_unet", "x unet"),
    ("decoding", "decoding"),
    ("vs_full", "x full"),
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
    if key in ("ratio", "vs_unet", "vs_full"):
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
        + (f" (data rows: {meta['rounds']} rounds)" if meta.get("rounds", 1) > 1 else "")
        + f" | {meta['threads']} torch threads | data: {meta['data']}",
        "img/s counts every image through the backbone: simclr rows 2 x batch per step (both"
        " views), data_ssl counts views; x ceiling = img/s / ceiling img/s at that size;",
        f"peak mem = {memory}; data wait = share of wall time blocked in next(loader);"
        " workers needed = ceil(step img/s / img/s per worker) for the step in brackets;",
        "unet = plain smp U-Net step (same encoder, decoder widths, seg outputs; BCE), x unet ="
        " img/s / unet img/s; decoding = JPEG decoding of loader rows (reduced: smallest DCT"
        " scale the crop allows), x full = reduced img/s / full img/s.",
        "decode = OpenCV decoding alone of the training JPEGs at each DCT scale, one thread:"
        " entropy decoding of the whole file is not scaled, so its x full bounds the data rows'.",
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
