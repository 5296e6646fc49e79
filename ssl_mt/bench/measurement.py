"""The bench runner: builds each requested workload, times it row by row, fills the ratios."""

from __future__ import annotations

import contextlib
import gc
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ssl_mt.bench.datasets import bench_dataset
from ssl_mt.bench.decoding import decode_rates, jpeg_files, mean_file_mib, scale_label
from ssl_mt.bench.instruments import PeakMemory, WindowTimer
from ssl_mt.bench.report import environment
from ssl_mt.bench.rows import Row, fill_ratios
from ssl_mt.bench.settings import DATA_ROWS, DECODE_ROW, BenchSettings
from ssl_mt.bench.timing import BatchStream, time_device_steps, time_e2e_steps, time_loader
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
