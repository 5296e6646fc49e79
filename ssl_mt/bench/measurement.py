"""Timing the workloads: device steps, loader-fed steps and loaders alone, row by row."""

from __future__ import annotations

import contextlib
import gc
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ssl_mt.bench.datasets import bench_dataset
from ssl_mt.bench.decoding import decode_rates, jpeg_files, mean_file_mib, scale_label
from ssl_mt.bench.instruments import PeakMemory, WindowTimer, to_device
from ssl_mt.bench.report import environment
from ssl_mt.bench.settings import DATA_ROWS, DECODE_ROW, FEEDS, STEP_ROWS, BenchSettings
from ssl_mt.bench.workloads import (
    CEILING_CLASSES,
    Workbench,
    build_ceiling,
    build_multitask,
    build_simclr,
    build_unet,
    random_mt_batch,
    tasks_of,
    train_images,
    train_loader,
)

# JPEGs the decode rows time (the first of the training images).
DECODE_IMAGES = 32


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
        self.tasks = tasks_of(settings)[1]
        self.rows: list[Row] = []

    def log(self, message: str) -> None:
        if self.s.progress:
            print(f"[bench] {message}", file=sys.stderr, flush=True)

    def run(self) -> list[Row]:
        for size, batch in zip(self.s.sizes, self.s.batch_sizes, strict=True):
            self._size(size, batch)
        if DECODE_ROW in self.s.only:
            self._decode_rows()
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
        args = (self.s, self.device, self.memory, size, batch)
        if "ceiling" in only:
            self.log(f"{size}px ceiling (batch {batch})")
            bench = build_ceiling(*args)
            images = self._images(batch, size)
            labels = torch.randint(CEILING_CLASSES, (batch,), device=self.device)
            self._device_row("ceiling", bench, (images, labels), size, batch, batch)
            del bench, images, labels
            self._release()
        if {"simclr", "simclr_e2e"} & only:
            bench = build_simclr(*args)
            if "simclr" in only:
                self.log(f"{size}px simclr (batch {batch} pairs)")
                views = [torch.randn(batch, 3, size, size, device=self.device) for _ in range(2)]
                self._device_row("simclr", bench, views, size, batch, 2 * batch)
                del views
            if "simclr_e2e" in only:
                self._e2e_row("simclr_e2e", "pretrain", bench, lambda b: b["views"], size, batch)
            del bench
            self._release()
        if "unet" in only:
            self.log(f"{size}px unet (batch {batch})")
            bench = build_unet(*args)
            seg = max(1, sum(t.is_segmentation for t in self.tasks))
            masks = (torch.rand(batch, seg, size, size, device=self.device) < 0.3).float()
            self._device_row("unet", bench, (self._images(batch, size), masks), size, batch, batch)
            del bench, masks
            self._release()
        if {"mt", "mt_e2e"} & only:
            bench = build_multitask(*args)
            if "mt" in only:
                self.log(f"{size}px mt (batch {batch})")
                data = random_mt_batch(self.tasks, batch, size, self.device)
                self._device_row("mt", bench, data, size, batch, batch)
                del data
            if "mt_e2e" in only:
                self._e2e_row("mt_e2e", "finetune", bench, lambda b: b, size, batch)
            del bench
            self._release()
        for name in DATA_ROWS:
            if name in only:
                self._data_rows(name, size, batch)

    def _images(self, batch: int, size: int) -> Tensor:
        memory_format = torch.channels_last if self.s.channels_last else torch.contiguous_format
        return torch.randn(batch, 3, size, size, device=self.device).contiguous(
            memory_format=memory_format
        )

    def _loader(self, app: str, size: int, batch: int, workers: int, decoding: str):
        pin = self.device.type == "cuda"
        return train_loader(app, self.s, self._root(), size, batch, workers, pin, decoding)

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
        app: str,
        bench: Workbench,
        prepare: Callable[[Any], Any],
        size: int,
        batch: int,
    ) -> None:
        workers, decoding = max(self.s.workers), self.s.decoding[0]
        images = 2 * batch if app == "pretrain" else batch
        self.log(f"{size}px {name} (batch {batch}, {workers} workers, {decoding} decoding)")
        stream = BatchStream(self._loader(app, size, batch, workers, decoding))
        try:
            self.memory.start()
            timer, waited = time_e2e_steps(bench.step, stream, prepare, self.s, self.device)
            peak = self.memory.peak_mib(bench.host_baseline)
        finally:
            stream.close()
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
            workers=workers,
            decoding=decoding,
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

    def _data_rows(self, name: str, size: int, batch: int) -> None:
        """The rows of one loader at every decoding and worker count, timed in
        ``s.rounds`` rounds that take the decodings in turn (times summed)."""
        totals: dict[tuple[str, int], list[float]] = {}
        for round_index in range(self.s.rounds):
            for decoding in self.s.decoding:
                for workers in self.s.workers:
                    self.log(
                        f"{size}px {name} ({decoding} decoding, batch {batch}, {workers} "
                        f"workers, round {round_index + 1}/{self.s.rounds})"
                    )
                    timed = self._time_loader(name, size, batch, workers, decoding)
                    total = totals.setdefault((decoding, workers), [0.0, 0, 0])
                    for i, value in enumerate(timed):
                        total[i] += value
        for decoding in self.s.decoding:
            for workers in self.s.workers:
                seconds, images, batches = totals[(decoding, workers)]
                self._data_row(name, size, batch, workers, decoding, seconds, images, batches)

    def _time_loader(
        self, name: str, size: int, batch: int, workers: int, decoding: str
    ) -> tuple[float, int, int]:
        app = "pretrain" if name == "data_ssl" else "finetune"
        stream = BatchStream(self._loader(app, size, batch, workers, decoding))
        try:
            return time_loader(stream, workers, self.s.steps)
        finally:
            stream.close()
            gc.collect()  # the loader's workers end with it (cheap: see run_bench)

    def _data_row(
        self,
        name: str,
        size: int,
        batch: int,
        workers: int,
        decoding: str,
        seconds: float,
        images: int,
        batches: int,
    ) -> None:
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
            decoding=decoding,
        )
        if name == "data_ssl":
            row.extra["pairs_per_s"] = rate / 2
            row.extra["pairs_per_s_per_worker"] = rate / 2 / max(1, workers)
        self.rows.append(row)

    def _decode_rows(self) -> None:
        paths = jpeg_files(train_images(self.s, self._root()), DECODE_IMAGES)
        if not paths:
            self.log("decode rows: the dataset has no JPEGs, nothing to measure")
            return
        self.log(f"decode rows: {len(paths)} JPEGs at full, 1/2, 1/4 and 1/8 scale")
        rates = decode_rates(paths, passes=max(self.s.rounds, self.s.steps // len(paths)))
        for factor, rate in rates.items():
            row = Row(
                row=DECODE_ROW,
                size=None,
                batch=1,
                images_per_step=1,
                images_per_s=rate,
                step_ms=1000.0 / rate,
                steps=len(paths),
                workers=1,
                images_per_s_per_worker=rate,
                decoding=scale_label(factor),
                vs_full=rate / rates[1],
            )
            row.extra["file_mib"] = mean_file_mib(paths)
            self.rows.append(row)


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
            root, data = bench_dataset(s, stack)
            rows = Bench(s, root).run()
            meta = environment(s, data)
    finally:
        gc.unfreeze()
        torch.set_num_threads(saved[0])
        torch.backends.cudnn.benchmark = saved[1]
        torch.set_float32_matmul_precision(saved[2])
    return {"meta": meta, "rows": [asdict(r) for r in rows]}
