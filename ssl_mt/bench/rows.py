"""The table's rows: one :class:`Row` per measurement, and the ratios between rows."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ssl_mt.bench.settings import FEEDS, STEP_ROWS


@dataclass
class Row:
    """One line of the table.

    ``images_per_s`` counts every image through the backbone (both SimCLR views; views for
    ``data_ssl``). ``ratio`` is ``images_per_s`` over the ceiling's at the same size.
    ``data_wait`` is the share of the timed wall time spent blocked in ``next(loader)``.
    ``decoding`` is the JPEG decoding of a loader-fed row; ``vs_full`` a reduced data row's
    rate over the full-decoding one (for a decode row: its scale's decoding rate over full
    decoding's); ``vs_unet`` a multi-task row's over the plain U-Net's.
    """

    row: str
    size: int | None  # None: a decode row (the same for every size)
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
    decoding: str | None = None
    vs_full: float | None = None
    vs_unet: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def fill_ratios(rows: list[Row]) -> None:
    """Ratios to the ceiling, to the plain U-Net and to full decoding, and, for data rows,
    the workers that keep the step fed (data rows of the first decoding measured)."""
    by_key = {(r.row, r.size): r for r in reversed(rows)}  # the first of several wins
    full = {(r.row, r.size, r.workers): r for r in rows if r.decoding == "full"}
    for r in rows:
        if r.row in STEP_ROWS:
            ceiling = by_key.get(("ceiling", r.size))
            if ceiling is not None and ceiling.images_per_s > 0:
                r.ratio = r.images_per_s / ceiling.images_per_s
            unet = by_key.get(("unet", r.size))
            if r.row in ("mt", "mt_e2e") and unet is not None:
                r.vs_unet = r.images_per_s / unet.images_per_s
        elif r.row in FEEDS and r.images_per_s_per_worker:
            reference = full.get((r.row, r.size, r.workers))
            if r.decoding == "reduced" and reference is not None:
                r.vs_full = r.images_per_s / reference.images_per_s
            for fed in FEEDS[r.row]:
                step = by_key.get((fed, r.size))
                if step is not None:
                    r.fed_row = fed
                    r.workers_needed = math.ceil(step.images_per_s / r.images_per_s_per_worker)
                    break
