"""``compile=true`` compiles once per stage of progressive resizing, never within one.

Both apps run through their real path (composed config, datamodule, Trainer with the
configured callbacks) on two stages of two epochs at 32 and 64 px, validating at both eval
sizes every epoch. Dynamo decides how many graphs there are and when it recompiles, whatever
the backend, so a counting backend stands in for inductor: every graph dynamo hands it is one
compilation. The first epoch of a stage compiles its training shapes (and, in the first
stage, the evaluation shapes, partial last batch included); the second epoch of the stage
must add none, nor may dynamo hit its recompile limit, after which it would silently run
the frame eagerly and the count would stop growing for the wrong reason. DINO over three
stages needs more graphs than dynamo's default limit: the modules must raise it themselves.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import lightning as L
import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

from ssl_mt import finetune, pretrain, runner
from ssl_mt.models.compilation import GRAPHS_PER_FAMILY, raise_recompile_limit
from tests.helpers import compose_app

DYNAMO_DEFAULT_LIMIT = 8
# Two stages of two epochs at two sizes: the switch of 224 -> 384, small.
STAGES = "[{size:32,epochs:2,batch_size:8},{size:64,epochs:2,batch_size:8}]"
EVAL_SIZES = "[32,64]"
COMMON = [
    "experiment=quick",
    "ckpt_path=null",
    "compile=true",
    # The GPU profiles' memory format: its strides are guarded too.
    "channels_last=true",
    "++trainer.enable_progress_bar=false",
    "data.num_workers=0",
    "data.pin_memory=false",
    # An eval batch that leaves a partial last batch of the val split.
    "data.eval_batch_size=5",
    f"schedule.stages={STAGES}",
    f"schedule.eval_sizes={EVAL_SIZES}",
]


class GraphCount(L.Callback):
    """Compiled graphs so far: at the start of each epoch, after its training and after its
    validation (the kNN monitor's pass before the first step counts in epoch 0)."""

    def __init__(self, backend: CompileCounter) -> None:
        self.backend = backend
        self.at_start: list[int] = []
        self.after_train: list[int] = []
        self.after_epoch: list[int] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.at_start.append(int(self.backend.frame_count))

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.after_train.append(int(self.backend.frame_count))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning runs the epoch's validation before this hook.
        self.after_epoch.append(int(self.backend.frame_count))


class LimitHits(logging.Handler):
    """Dynamo's warnings that a frame hit its recompile (cache size) limit."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "hit config." in message:
            self.messages.append(message)

    def all(self) -> list[str]:
        """The warnings and dynamo's own count of the frames it gave up on."""
        gave_up = [k for k in counters["unimplemented"] if "recompile limit" in k.lower()]
        return self.messages + gave_up


@pytest.fixture
def counting_compile(monkeypatch):
    """``torch.compile`` (and so ``nn.Module.compile``) with a counting backend.

    Yields ``(backend, limit_hits)``; dynamo is reset before and after.
    """
    backend = CompileCounter()
    real = torch.compile

    def compile_counting(*args, **kwargs):
        kwargs["backend"] = backend
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", compile_counting)
    # Importing timm.optim (ssl_mt.optim does, when the trainer builds the optimiser) sets
    # dynamo's limit to a million, which would hide a module that does not raise it for its
    # own graphs: import it now, then start from dynamo's default.
    importlib.import_module("timm.optim")
    torch._dynamo.reset()
    counters.clear()
    hits = LimitHits()
    dynamo_log = logging.getLogger("torch._dynamo")
    dynamo_log.addHandler(hits)
    try:
        with torch._dynamo.config.patch(recompile_limit=DYNAMO_DEFAULT_LIMIT):
            yield backend, hits
    finally:
        dynamo_log.removeHandler(hits)
        torch._dynamo.reset()


def fit_counting(app, cfg, backend: CompileCounter, monkeypatch) -> GraphCount:
    """Runs ``app.run(cfg)`` with a :class:`GraphCount` callback; returns it.

    Also checks the checkpoint: ``nn.Module.compile`` compiles in place, so the tensors keep
    their names (no ``_orig_mod.`` of a ``torch.compile(module)`` wrapper).
    """
    count = GraphCount(backend)
    monkeypatch.setattr(app, "build_trainer", lambda c: runner.build_trainer(c, [count]))
    run_dir = app.run(cfg)
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu")["state_dict"]
    assert state and not [k for k in state if "_orig_mod" in k]
    return count


def per_epoch(count: GraphCount) -> list[tuple[int, int, int]]:
    """(before training, training, validation) graphs added in each epoch."""
    added = []
    before = 0
    for start, train, end in zip(count.at_start, count.after_train, count.after_epoch, strict=True):
        added.append((start - before, train - start, end - train))
        before = end
    return added


def check_graphs(
    count: GraphCount, hits: LimitHits, stages: int, label: str, epochs: int = 2
) -> None:
    """Asserts graphs are added in the first epoch of each stage only and that nothing broke
    a graph; prints the counts."""
    added = per_epoch(count)
    print(f"{label} graphs per epoch (start, train, val):", added, dict(counters["graph_break"]))
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert len(added) == stages * epochs, added
    assert not hits.all(), f"{added}: {hits.all()}"
    assert added[0][1] > 0 and sum(added[0][::2]) > 0, added  # training and eval shapes
    for stage in range(stages):
        first = stage * epochs
        assert added[first][1] > 0, f"no new training graph in stage {stage + 1}: {added}"
        for epoch in range(first + 1, first + epochs):
            assert added[epoch] == (0, 0, 0), f"recompiled in epoch {epoch}: {added}"


def test_finetune_compiles_once_per_stage(
    synthetic_root: Path, tmp_path: Path, counting_compile, monkeypatch
):
    backend, hits = counting_compile
    cfg = compose_app(
        "finetune",
        [
            *COMMON,
            f"data.root={synthetic_root}",
            f"run_dir={tmp_path / 'run'}",
            "test_after_fit=false",
            "eval_records=false",
        ],
    )
    count = fit_counting(finetune, cfg, backend, monkeypatch)
    check_graphs(count, hits, stages=2, label="finetune")


def test_pretrain_compiles_once_per_stage(
    synthetic_root: Path, tmp_path: Path, counting_compile, monkeypatch
):
    backend, hits = counting_compile
    cfg = compose_app(
        "pretrain",
        [*COMMON, f"data.root={synthetic_root}", f"run_dir={tmp_path / 'run'}"],
    )
    count = fit_counting(pretrain, cfg, backend, monkeypatch)
    check_graphs(count, hits, stages=2, label="pretrain")


def test_multi_crop_pretraining_over_three_stages_stays_compiled(
    synthetic_root: Path, tmp_path: Path, counting_compile, monkeypatch
):
    """DINO's global and local crops are two shapes per stage: with the kNN monitor's three
    (bank, queries, partial batches), three stages need more graphs than dynamo's default
    recompile limit (8) allows."""
    backend, hits = counting_compile
    cfg = compose_app(
        "pretrain",
        [
            *COMMON,
            f"data.root={synthetic_root}",
            f"run_dir={tmp_path / 'run'}",
            "method=dino",
            "method.head.out_dim=64",
            "method.head.hidden_dim=32",
            "method.head.bottleneck_dim=16",
            "method.views.local_crops=2",
            "schedule.stages=[{size:32,epochs:2,batch_size:8},{size:48,epochs:2,batch_size:8},"
            "{size:96,epochs:2,batch_size:8}]",
        ],
    )
    count = fit_counting(pretrain, cfg, backend, monkeypatch)
    check_graphs(count, hits, stages=3, label="dino")


def test_raise_recompile_limit_raises_and_never_lowers():
    config = torch._dynamo.config
    with config.patch(recompile_limit=8, accumulated_recompile_limit=16):
        assert raise_recompile_limit(3) == 3 * GRAPHS_PER_FAMILY
        assert config.cache_size_limit == 3 * GRAPHS_PER_FAMILY  # the older name, an alias
        assert config.accumulated_recompile_limit == 3 * GRAPHS_PER_FAMILY
        assert raise_recompile_limit(1) == 3 * GRAPHS_PER_FAMILY
    with config.patch(recompile_limit=1000):
        assert raise_recompile_limit(2) == 1000
