"""Instruments of a measurement: precision (autocast and backward/step as Lightning does
them), timed windows (CUDA events on the GPU), peak memory, and host-to-device copies."""

from __future__ import annotations

import contextlib
import gc
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


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
