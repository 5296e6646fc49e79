"""The multi-task module under 2-process gloo DDP against one process on the concatenated batch.

- Training: a task's loss is the mean over its labeled samples of the whole global batch,
  also when one rank holds no label of a task and the other several; loss and gradients
  (averaged over the ranks, as DDP does) equal one process to 1e-5, for every weighting,
  with gradient accumulation too. The per-rank mean that DDP used to average is off.
- A rank whose batch was all bad trains on an empty batch: the other rank's step goes on,
  both make the same collectives and end with the same parameters.
- Validation: a rank whose shard has no label of a task still joins every metric's sync;
  an odd-sized val set sharded without repeats logs what one process logs; a task labeled
  nowhere is left out of the global loss.

The network runs in eval mode (BatchNorm on running statistics, no dropout): the reduction
of the losses is what is tested, not BatchNorm's batch statistics.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from ssl_mt.config import load_tasks_config
from ssl_mt.models.multitask import MultiTaskModule
from ssl_mt.schedule import ResolutionSchedule
from tests.gloo import start_ranks

WORLD, LOCAL, SIZE = 2, 4, 32
DECODER = [64, 32, 16, 16, 8]
WEIGHTINGS = ("fixed", "uncertainty", "dwa", "famo")
TIMEOUT = timedelta(seconds=60)

pytestmark = [pytest.mark.ddp, pytest.mark.slow]


def make_module(weighting: str = "fixed", nonfinite: str = "raise") -> MultiTaskModule:
    torch.manual_seed(0)
    module = MultiTaskModule(
        tasks=load_tasks_config("default"),
        backbone={"name": "test_efficientnet", "pretrained": False, "weights": None},
        optim={"name": "adamw", "base_lr": 1e-3, "weight_decay": 0.0},
        weighting={"name": weighting},
        eval_sizes=[SIZE],
        decoder_channels=DECODER,
        channels_last=False,
        nonfinite={"policy": nonfinite},
    )
    module.train()
    module.net.eval()  # deterministic forward: running BatchNorm statistics, no dropout
    return module


def attach(module: MultiTaskModule, accumulate: int = 1, windows=None) -> None:
    """A stand-in for the trainer: accumulation, the schedule, the window label counts."""

    def train_label_counts(batch_idx, k, names):
        return windows[batch_idx // k]

    datamodule = SimpleNamespace(
        schedule=ResolutionSchedule([{"size": SIZE, "epochs": 1, "batch_size": LOCAL}]),
        train_label_counts=train_label_counts,
    )
    module._trainer = SimpleNamespace(
        accumulate_grad_batches=accumulate, datamodule=datamodule, global_step=0, current_epoch=0
    )


# Global batch of 8: presence per task (rank 0 = samples 0-3, rank 1 = 4-7). Rank 0 has no
# tone label and one skin label, rank 1 three tone labels and four skin labels.
PRESENCE = {
    "skin": [1, 0, 0, 0, 1, 1, 1, 1],
    "scalp": [1, 1, 0, 1, 0, 0, 1, 0],
    "blur": [1, 1, 1, 1, 1, 1, 1, 1],
    "tone": [0, 0, 0, 0, 1, 1, 0, 1],
    "relevance": [0, 1, 1, 1, 0, 1, 0, 0],
}
CLASSES = {"blur": 3, "tone": 10, "relevance": 2}


def global_batch(n: int = 2 * LOCAL, seed: int = 1, presence=PRESENCE) -> dict:
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(n, 3, SIZE, SIZE, generator=gen)
    target, present = {}, {}
    for name, flags in presence.items():
        present[name] = torch.tensor(flags[:n], dtype=torch.bool)
        if name in CLASSES:
            labels = torch.randint(0, CLASSES[name], (n,), generator=gen)
            target[name] = torch.where(present[name], labels, -1)
        else:
            target[name] = (torch.rand(n, 1, SIZE, SIZE, generator=gen) > 0.6).float()
    return {"image": image, "target": target, "present": present}


def part(batch: dict, start: int, stop: int) -> dict:
    return {
        "image": batch["image"][start:stop],
        "target": {k: v[start:stop] for k, v in batch["target"].items()},
        "present": {k: v[start:stop] for k, v in batch["present"].items()},
    }


def grads(module: MultiTaskModule) -> dict[str, torch.Tensor]:
    return {
        n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        for n, p in module.named_parameters()
    }


def window_counts(batch: dict, micro: list[tuple[int, int]]) -> torch.Tensor:
    names = list(PRESENCE)
    total = torch.zeros(len(names))
    for start, stop in micro:
        total += torch.stack([batch["present"][n][start:stop].sum() for n in names]).float()
    return total


def train_steps(module, batches: list[dict], accumulate: int = 1, windows=None) -> dict:
    """Runs steps (each a list of micro-batches) with Lightning's 1/K; DDP's average of grads."""
    attach(module, accumulate, windows)
    totals = []
    for step in batches:
        module.zero_grad(set_to_none=True)
        for k, micro in enumerate(step):
            loss = module.training_loss(micro, k)
            (loss.total / accumulate).backward()
            totals.append(loss.total.detach())
    result = grads(module)
    if dist.is_initialized():
        for g in result.values():
            dist.all_reduce(g)
            g /= dist.get_world_size()
    state = {k: v.clone() for k, v in module.weighting.state_dict().items()}
    return {"totals": torch.stack(totals), "grads": result, "weighting": state}


def _init(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, WORLD + 1, is_master=False, timeout=TIMEOUT)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=TIMEOUT)


def _run_ranks(worker, tmp_path: Path) -> list[dict]:
    """Runs ``worker`` in 2 processes from a fork server (:func:`tests.gloo.start_ranks`)."""
    store = dist.TCPStore("127.0.0.1", 0, WORLD + 1, is_master=True, wait_for_workers=False)
    start_ranks(worker, WORLD, store.port, str(tmp_path))
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# -- training: exact global means -------------------------------------------------------------
def _train_rank(rank: int) -> dict:
    lo, hi = rank * LOCAL, (rank + 1) * LOCAL
    first, second = global_batch(seed=1), global_batch(seed=2)
    results = {}
    for name in WEIGHTINGS:  # two steps: FAMO's logits move after the first
        steps = [[part(first, lo, hi)], [part(second, lo, hi)]]
        results[name] = train_steps(make_module(name), steps)
    # Accumulation: two micro-batches of 2 per rank; the window's labels over both ranks.
    micro = [(lo, lo + 2), (lo + 2, hi)]
    windows = [window_counts(first, micro)]
    steps = [[part(first, a, b) for a, b in micro]]
    results["accumulated"] = train_steps(make_module("uncertainty"), steps, 2, windows)
    # What DDP averaged before: each rank's masked mean over its own labels.
    module = make_module("fixed")
    local = part(first, lo, hi)
    losses = module.task_losses(module(local["image"]), local)
    present = {n: f.any() for n, f in local["present"].items()}
    module.weighting(losses, present)[0].backward()
    old = grads(module)
    for g in old.values():
        dist.all_reduce(g)
        g /= WORLD
    results["per_rank_mean"] = old
    return results


def _worker(rank: int, port: int, out: str) -> None:
    """Every 2-process scenario of this module, in one pair of processes."""
    _init(rank, port)
    try:
        result = {
            "train": _train_rank(rank),
            "bad_batch": _bad_batch_rank(rank),
            "nonfinite": _nonfinite_rank(rank),
            "val": evaluate(make_module(), _val_batches(rank, WORLD)),
        }
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return _run_ranks(_worker, tmp_path_factory.mktemp("mt_ddp"))


@pytest.fixture(scope="module")
def trained(ranks) -> list[dict]:
    return [r["train"] for r in ranks]


def _assert_grads_close(actual: dict, expected: dict) -> None:
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_loss_and_gradients_equal_one_process_on_the_global_batch(trained, weighting):
    batches = [[global_batch(seed=1)], [global_batch(seed=2)]]
    single = train_steps(make_module(weighting), batches)
    for rank in range(WORLD):
        result = trained[rank][weighting]
        # The loss of every step is the global one, on every rank.
        torch.testing.assert_close(result["totals"], single["totals"], rtol=1e-5, atol=1e-6)
        _assert_grads_close(result["grads"], single["grads"])
        for key, value in single["weighting"].items():  # FAMO's logits, DWA's buffers
            torch.testing.assert_close(result["weighting"][key], value, equal_nan=True, msg=key)


@pytest.mark.timeout(300)
def test_accumulated_micro_batches_on_two_ranks_equal_one_batch(trained):
    single = train_steps(make_module("uncertainty"), [[global_batch(seed=1)]])
    for rank in range(WORLD):
        result = trained[rank]["accumulated"]
        # The mean of the micro-batches' values is the step's loss.
        assert float(result["totals"].mean()) == pytest.approx(float(single["totals"][0]), 1e-5)
        _assert_grads_close(result["grads"], single["grads"])


@pytest.mark.timeout(300)
def test_the_per_rank_mean_ddp_averaged_before_is_not_the_global_mean(trained):
    single = train_steps(make_module("fixed"), [[global_batch(seed=1)]])
    old = trained[0]["per_rank_mean"]
    head = "net.heads.tone.fc.weight"  # tone: no label on rank 0, three on rank 1
    assert head in old, sorted(old)[:5]
    # Rank 0's missing tone labels halve the tone head's gradient.
    torch.testing.assert_close(old[head], single["grads"][head] / 2, rtol=1e-4, atol=1e-7)
    assert (old[head] - single["grads"][head]).abs().max() > 1e-4


def test_accumulation_in_one_process_equals_one_batch():
    batch = global_batch(seed=3)
    micro = [(0, 3), (3, 5), (5, 8)]  # uneven micro-batches, tone only in the last two
    steps = [[part(batch, a, b) for a, b in micro]]
    accumulated = train_steps(make_module("fixed"), steps, 3, [window_counts(batch, micro)])
    single = train_steps(make_module("fixed"), [[batch]])
    _assert_grads_close(accumulated["grads"], single["grads"])
    assert float(accumulated["totals"].mean()) == pytest.approx(float(single["totals"][0]), 1e-5)


def test_famo_refuses_gradient_accumulation():
    module = make_module("famo")
    attach(module, 2, [torch.ones(len(PRESENCE))])
    with pytest.raises(ValueError, match=r"famo needs trainer\.accumulate_grad_batches=1"):
        module.training_loss(part(global_batch(), 0, 2), 0)


# -- a rank whose batch was all bad ----------------------------------------------------------
def _bad_batch_rank(rank: int) -> dict:
    module = make_module("uncertainty")
    batch = part(global_batch(seed=4), 0, LOCAL) if rank == 0 else {"bad_samples": ["x"]}
    result = train_steps(module, [[batch]])
    with torch.no_grad():  # the optimiser step, the same on both ranks
        for p, g in zip(module.parameters(), result["grads"].values(), strict=True):
            p -= 0.1 * g
    result["params"] = {n: p.detach().clone() for n, p in module.named_parameters()}
    return result


@pytest.mark.timeout(300)
def test_a_rank_with_an_all_bad_batch_keeps_in_step(ranks):
    ranks = [r["bad_batch"] for r in ranks]
    for name, value in ranks[0]["params"].items():
        assert torch.equal(ranks[1]["params"][name], value), name
    # Rank 1 contributed nothing: the step is rank 0's batch alone, in one process.
    single = train_steps(make_module("uncertainty"), [[part(global_batch(seed=4), 0, LOCAL)]])
    _assert_grads_close(ranks[0]["grads"], single["grads"])
    for rank in range(WORLD):
        assert float(ranks[rank]["totals"][0]) == pytest.approx(float(single["totals"][0]), 1e-5)


def _nonfinite_rank(rank: int) -> dict:
    module = make_module("fixed", nonfinite="skip")
    attach(module)
    module.log = lambda *_, **__: None
    batch = part(global_batch(seed=5), rank * LOCAL, (rank + 1) * LOCAL)
    if rank == 1:
        batch["image"] = batch["image"] * float("nan")
    skipped = module.training_loss(batch, 0) is None
    return {"skipped": skipped, "count": int(module.nonfinite.skipped)}


@pytest.mark.timeout(300)
def test_a_non_finite_loss_on_one_rank_skips_the_step_on_both(ranks):
    ranks = [r["nonfinite"] for r in ranks]
    assert [r["skipped"] for r in ranks] == [True, True]
    assert [r["count"] for r in ranks] == [1, 1]


# -- validation ----------------------------------------------------------------------------
# 7 val samples (odd): rank r gets r, r+2, ... (4 + 3, no repeat). Tone is labeled on sample
# 3 only, which rank 1 holds; scalp is labeled nowhere.
VAL_PRESENCE = {
    "skin": [1, 1, 0, 1, 1, 0, 1],
    "scalp": [0, 0, 0, 0, 0, 0, 0],
    "blur": [1, 1, 1, 1, 1, 1, 1],
    "tone": [0, 0, 0, 1, 0, 0, 0],
    "relevance": [1, 0, 1, 1, 0, 1, 1],
}


def evaluate(module: MultiTaskModule, batches: list[dict]) -> dict[str, float]:
    logged: dict[str, float] = {}
    module.log = lambda name, value, **_: logged.__setitem__(name, float(value))
    module.eval()
    with torch.no_grad():
        for _ in range(2):  # two epochs: the states are reset in between
            for batch in batches:
                module._eval_step(batch, 0)
            module._log_eval("val")
    return logged


def _val_batches(rank: int, world: int) -> list[dict]:
    data = global_batch(7, seed=6, presence=VAL_PRESENCE)
    indices = list(range(rank, 7, world))
    shard = {
        "image": data["image"][indices],
        "target": {k: v[indices] for k, v in data["target"].items()},
        "present": {k: v[indices] for k, v in data["present"].items()},
    }
    # Batches of 2: rank 0 2 + 2, rank 1 2 + 1, one process 2 + 2 + 2 + 1.
    return [part(shard, i, i + 2) for i in range(0, len(indices), 2)]


@pytest.mark.timeout(300)
def test_validation_with_a_task_unlabeled_on_one_rank_logs_what_one_process_logs(ranks, caplog):
    ranks = [r["val"] for r in ranks]
    with caplog.at_level("WARNING", logger="ssl_mt.models.multitask"):
        single = evaluate(make_module(), _val_batches(0, 1))
    assert "val/32/tone/loss" in single and "val/32/tone/top1" in single
    assert not any("/scalp/" in key for key in single), sorted(single)
    expected = sum(single[f"val/32/{t}/loss"] for t in ("skin", "blur", "tone", "relevance"))
    assert single["val/32/global/loss"] == pytest.approx(expected, rel=1e-6)
    # Named once, not every epoch.
    named = [r for r in caplog.records if "no labeled sample of task(s) ['scalp']" in r.message]
    assert len(named) == 1, [r.message for r in caplog.records]
    for rank in range(WORLD):
        assert set(ranks[rank]) == set(single)
        for key, value in single.items():
            assert ranks[rank][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
