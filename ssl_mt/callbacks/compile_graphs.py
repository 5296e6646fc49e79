"""How many graphs ``compile=true`` compiled, per epoch: where a run recompiles shows up.

Logs, at the end of every training epoch (after its validation), dynamo's running totals:

- ``compile/graphs``: graphs compiled so far (``counters["stats"]["unique_graphs"]``), the
  count ``tests/models/test_compile_graphs.py`` checks with a counting backend;
- ``compile/graph_breaks``: graph breaks so far;
- ``compile/limit_hits``: frames that hit dynamo's recompile limit, after which dynamo runs
  them eagerly, silently (its warnings and its own count of the frames it gave up on).

A stage of progressive resizing should add graphs in its first epoch only. Not in the
default callbacks: add it with ``+callbacks.compile_graphs._target_=ssl_mt.callbacks.
compile_graphs.CompileGraphs`` (``python -m ssl_mt.bench.gpu_check`` does).
"""

from __future__ import annotations

import logging

import lightning as L

DYNAMO_LOGGER = "torch._dynamo"


class LimitWarnings(logging.Handler):
    """Dynamo's warnings that a frame hit its recompile (cache size) limit."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "hit config." in record.getMessage():
            self.count += 1


def dynamo_totals() -> dict[str, int]:
    """Dynamo's process-wide totals: graphs compiled, graph breaks, frames given up on."""
    from torch._dynamo.utils import counters

    gave_up = [k for k in counters["unimplemented"] if "recompile limit" in str(k).lower()]
    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "gave_up": len(gave_up),
    }


class CompileGraphs(L.Callback):
    """Logs ``compile/graphs``, ``compile/graph_breaks`` and ``compile/limit_hits`` (running
    totals of the process) at the end of every training epoch."""

    def __init__(self) -> None:
        self.warnings = LimitWarnings()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logging.getLogger(DYNAMO_LOGGER).addHandler(self.warnings)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning runs the epoch's validation before this hook: its graphs count here.
        totals = dynamo_totals()
        pl_module.log("compile/graphs", float(totals["graphs"]), rank_zero_only=True)
        pl_module.log("compile/graph_breaks", float(totals["graph_breaks"]), rank_zero_only=True)
        hits = totals["gave_up"] + self.warnings.count
        pl_module.log("compile/limit_hits", float(hits), rank_zero_only=True)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        logging.getLogger(DYNAMO_LOGGER).removeHandler(self.warnings)
