"""Both apps under 2-process CPU DDP (gloo), launched through Hydra's command line.

Lightning starts rank 1 by re-running the command (with ``hydra.run.dir`` of rank 0 and
``hydra.output_subdir=null``). Each run must finish with exit code 0 and write ONE run
directory (nothing in the working directory besides it), ONE metrics.csv with one row per
epoch for epoch-level keys, the checkpoint, and (pretrain) one backbone export.

Validation is reduced over the ranks: the last epoch's logged values are recomputed in this
process from ``last.ckpt`` (weights and BatchNorm buffers of rank 0, which DDP broadcasts
before every forward) on the two shards the ranks' samplers produced; the fine-tuning value
must differ from rank 0's shard alone. 41 training images: 20 per rank. Pretraining's 7
validation images are padded by DistributedSampler to 4 + 4 (the kNN monitor gathers
equal-sized tensors); fine-tuning's are sharded without repeats, 4 + 3.

Fine-tuning also meets, under DDP, what used to stop it: a val split where one task is
labeled on rank 1's shard only and another nowhere (compute() skipped on one rank: gloo's
"collective mismatch"; a NaN global loss), and a training batch of rank 1 whose images are
all bad (``training_step`` returned None, which Lightning refuses under DDP). It then
resumes for a second epoch: still one run directory, one metrics.csv, one checkpoint set.
"""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from reliability_helpers import (
    app_command,
    compose_app,
    finish,
    launch,
    per_epoch,
    read_metrics,
    tiny_overrides,
)

pytestmark = [pytest.mark.slow, pytest.mark.ddp]

STAGES = {
    "finetune": "schedule.stages=[{size:32,epochs:2,batch_size:4}]",  # 5 steps per rank
    "pretrain": "schedule.stages=[{size:32,epochs:2,batch_size:8}]",  # 2 steps per rank
}
FIRST_EPOCH = "schedule.stages=[{size:32,epochs:1,batch_size:4}]"  # finetune, then resumed


def _ddp_run(
    app: str, root: Path, cwd: Path, reaper: list, *extra: str, stages: str | None = None
) -> tuple[Path, str]:
    run_dir = cwd / "run"
    overrides = [*tiny_overrides(app, root, stages or STAGES[app]), "trainer=ddp_cpu", *extra]
    log = cwd.parent / f"{cwd.name}.out"
    text = finish(
        launch(app_command(app, *overrides, f"hydra.run.dir={run_dir}"), cwd, log, reaper), log
    )
    assert [p.name for p in cwd.iterdir()] == ["run"], "something was written outside the run"
    assert not (cwd / "outputs").exists() and not (cwd / "runs").exists()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert len(list(run_dir.rglob("metrics*.csv"))) == 1
    assert len(list(run_dir.glob(".hydra/config.yaml"))) == 1
    return run_dir, text


def _datamodule(cfg, rank: int, epoch: int):
    datamodule = instantiate(cfg.data, _recursive_=False, _convert_="all")
    datamodule.setup("fit")
    datamodule.trainer = SimpleNamespace(world_size=2, global_rank=rank, current_epoch=epoch)
    return datamodule


def _shards(app: str, root: Path, run_dir: Path):
    """The composed config and the validation loaders of rank 0 and rank 1."""
    cfg = compose_app(app, [*tiny_overrides(app, root, STAGES[app]), f"run_dir={run_dir}"])
    return cfg, [_datamodule(cfg, rank, 1).val_dataloader() for rank in (0, 1)]


def _hard_copy(root: Path, tmp_path: Path) -> tuple[Path, list[Path]]:
    """A copy of the data with val skin labels on rank 1's shard only, no val tone label,
    and rank 1's first training batch of epoch 0 all unreadable. Returns the bad images."""
    data = tmp_path / "data"
    shutil.copytree(root, data)
    with (data / "labels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    val = [row for row in rows if row["split"] == "val"]
    for position, row in enumerate(val):  # rank r's shard: positions r, r + 2, ...
        row["tone"] = ""
        if position % 2 == 0:
            row["skin_mask"] = ""
    assert any(row["skin_mask"] for row in val)
    with (data / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cfg = compose_app("finetune", tiny_overrides("finetune", data, FIRST_EPOCH))
    loader = _datamodule(cfg, 1, 0).train_dataloader()
    first = [index for _, index in list(loader.sampler)[: loader.batch_size]]
    bad = [data / loader.dataset.samples[i].image.relative_to(data) for i in first]
    for path in bad:
        path.write_bytes(b"\x00not an image\xff" * 20)
    return data, bad


def _load(module, run_dir: Path):
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 1
    module.load_state_dict(state["state_dict"])
    return module.eval()


def _finetune_val_loss(module, loaders, ranks) -> float:
    for per_task in module.val_metrics.values():
        for metrics in per_task.values():
            for metric in metrics.values():
                metric.reset()
    with torch.no_grad():
        for rank in ranks:
            for batch in loaders[rank][0]:
                module._eval_step(batch, 0)
    losses = [
        m["loss"].compute() for m in module.val_metrics["32"].values() if m["loss"].weight > 0
    ]
    return float(torch.stack(losses).sum())


@pytest.mark.timeout(900)
def test_finetune_under_ddp_with_partial_val_labels_a_bad_batch_and_a_resume(
    synthetic_root, tmp_path, reaper
):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    data, bad = _hard_copy(synthetic_root, tmp_path)
    skip = "data.on_bad_sample=skip"
    run_dir, first = _ddp_run("finetune", data, cwd, reaper, skip, stages=FIRST_EPOCH)
    assert "collective mismatch" not in first
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert (state["epoch"], state["global_step"]) == (0, 5)
    # The same command with a second epoch resumes the run in place.
    _, text = _ddp_run("finetune", data, cwd, reaper, skip, stages=STAGES["finetune"])
    assert "resuming from" in text
    df = read_metrics(run_dir)
    for column in ("train/global/loss", "val/32/global/loss", "val/32/skin/iou", "train/size"):
        assert set(per_epoch(df, column)) == {0, 1}, column
    assert not [c for c in df.columns if c.startswith("val/32/tone/")], "tone has no val label"
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 2 * 5  # 20 images per rank, batches of 4
    # One checkpoint set: last + the best by the (finite) global loss.
    losses = per_epoch(df, "val/32/global/loss")
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
    best = min(losses, key=losses.get)
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == sorted(["last.ckpt", f"best_epoch{best:03d}.ckpt"]), names
    # The bad images were met by rank 1 (its whole first batch) and listed.
    listed = (run_dir / "bad_samples.txt").read_text()
    for path in bad:
        assert any(
            line.startswith("epoch 0 rank 1: ") and str(path) in line
            for line in listed.splitlines()
        ), (path, listed)
    log = first + text + "".join(p.read_text() for p in run_dir.glob("*.log"))
    assert "no labeled sample of task(s) ['tone']" in log

    from ssl_mt.finetune import build_module

    cfg = compose_app("finetune", [*tiny_overrides("finetune", data, STAGES["finetune"]), skip])
    loaders = [_datamodule(cfg, rank, 1).val_dataloader() for rank in (0, 1)]
    indices = [[int(i) for b in loaders[r][0] for i in b["index"]] for r in (0, 1)]
    assert [len(i) for i in indices] == [4, 3]
    assert sorted(indices[0] + indices[1]) == list(range(7)), indices  # each sample once
    module = _load(build_module(cfg), run_dir)
    both = _finetune_val_loss(module, loaders, (0, 1))
    rank0 = _finetune_val_loss(module, loaders, (0,))
    assert losses[1] == pytest.approx(both, rel=1e-5), (losses[1], both, rank0)
    assert abs(losses[1] - rank0) > 1e-4 * abs(losses[1]), "the logged value is rank 0's alone"
    # The per-image val losses of every epoch, gathered from both ranks (4 + 3 images): every
    # labeled (image, task) once, and at the last epoch the last checkpoint's own records.
    import pandas as pd

    from ssl_mt.callbacks.curve_records import curve_path
    from ssl_mt.evaluation.records import read_records

    for epoch in (0, 1):
        curve = pd.read_csv(curve_path(run_dir / "eval" / "curves", 32, epoch))
        assert not curve.duplicated(["image", "task"]).any()
        assert curve["image"].nunique() == 7, curve
    last = read_records(run_dir / "eval" / "last" / "val_32.csv.gz").set_index(["image", "task"])
    final = curve.set_index(["image", "task"])["loss"].sort_index()
    assert sorted(final.index) == sorted(last.index)
    assert final.to_numpy() == pytest.approx(last["loss"].reindex(final.index).to_numpy(), rel=1e-4)


@pytest.mark.timeout(900)
def test_pretrain_under_ddp(synthetic_root, tmp_path, reaper):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    run_dir, text = _ddp_run("pretrain", synthetic_root, cwd, reaper)
    # The export: written once, by rank 0 (rank 1's Hydra log is in the same folder).
    assert (run_dir / "backbone" / "model.safetensors").is_file()
    assert (run_dir / "backbone" / "config.json").is_file()
    logs = text + "".join(p.read_text() for p in run_dir.glob("*.log"))
    assert len(set(re.findall(r"\]\[INFO\] - exported backbone to .*", logs))) == 1
    assert len(re.findall(r"exported backbone to", text)) == 1
    df = read_metrics(run_dir)
    for column in ("train/loss", "knn/tone/top1", "knn/relevance/top1", "train/embedding_std"):
        assert set(per_epoch(df, column)) == {0, 1}, column
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4

    # The kNN monitor's accuracy from the features of both ranks, gathered as all_gather does.
    from ssl_mt.models.knn import knn_predict
    from ssl_mt.pretrain import build_module

    cfg, loaders = _shards("pretrain", synthetic_root, run_dir)
    module = _load(build_module(cfg), run_dir)
    tasks = loaders and [
        t for t in instantiate(cfg.data, _recursive_=False, _convert_="all").knn_tasks
    ]
    gathered = {}
    with torch.no_grad():
        for split in (0, 1):  # bank, queries
            feats, labels = [], []
            for rank in (0, 1):
                for batch in loaders[rank][split]:
                    feats.append(module.features(batch["image"]).float())
                    labels.append(torch.stack([batch["target"][t.name] for t in tasks], dim=1))
            gathered[split] = (torch.cat(feats), torch.cat(labels))
    (bank, bank_labels), (query, query_labels) = gathered[0], gathered[1]
    for column, task in enumerate(tasks):
        in_bank, in_query = bank_labels[:, column] >= 0, query_labels[:, column] >= 0
        predicted = knn_predict(
            bank[in_bank],
            bank_labels[in_bank, column],
            query[in_query],
            task.num_classes,
            k=int(cfg.method.knn.k),
            temperature=float(cfg.method.knn.temperature),
        )
        accuracy = float((predicted == query_labels[in_query, column]).float().mean())
        assert per_epoch(df, f"knn/{task.name}/top1")[1] == pytest.approx(accuracy, abs=1e-6)
