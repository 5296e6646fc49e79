"""A fault on one rank never leaves the others waiting: 2-process gloo groups on the CPU.

- ``nonfinite.policy=raise`` with a NaN loss on rank 1 only: both ranks stop at the same
  step with the same message (step, task, rank), in seconds, for the SSL methods (the
  guard's own ``all_reduce``) and for fine-tuning (the flags ride in the task-loss
  ``all_reduce``). A hang would last the group's timeout (``GROUP_TIMEOUT``) at least.
- The kNN monitor with a rank that has no query batch, no batch at all, or fewer rows than
  the other (``data.on_bad_sample=skip``): the scores equal one process on every sample.
- Fine-tuning validation with a rank whose whole shard is bad: what one process logs on the
  other rank's shard.

The groups run with ``TORCH_DISTRIBUTED_DEBUG=DETAIL``: gloo then checks that every rank
makes the same collective, with the same shapes, and fails on a mismatch instead of hanging.
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
from ssl_mt.models.nonfinite import NonFiniteLossError
from ssl_mt.models.ssl_base import SSLModule
from ssl_mt.schedule import ResolutionSchedule
from tests.gloo import fork_ranks, gloo_group

pytestmark = [pytest.mark.ddp]

WORLD, SIZE, LOCAL = 2, 32, 4
GROUP_TIMEOUT = timedelta(seconds=20)
DEADLINE_S = 90.0
BAD_STEP = 7
KNN_TASKS = [SimpleNamespace(name="blur", num_classes=3)]
PRESENCE = {  # every task labeled on each shard of 4
    "skin": [1, 0, 1, 1],
    "scalp": [1, 1, 0, 1],
    "blur": [1, 1, 1, 1],
    "tone": [0, 1, 1, 0],
    "relevance": [1, 0, 1, 1],
}
CLASSES = {"blur": 3, "tone": 10, "relevance": 2}


class TinySSL(SSLModule):
    """The base class's training step and kNN monitor around a trivial loss."""

    poisoned = False

    def ssl_step(self, views):
        z = self.features(views[0])
        loss = z.square().mean()
        return (loss * float("nan") if self.poisoned else loss), z, {}


def fake_trainer(run_dir: str, world: int, **datamodule) -> SimpleNamespace:
    """What the modules read from their trainer in these steps."""
    return SimpleNamespace(
        datamodule=SimpleNamespace(on_bad_sample="skip", knn_tasks=KNN_TASKS, **datamodule),
        global_step=BAD_STEP,
        current_epoch=0,
        default_root_dir=run_dir,
        accumulate_grad_batches=1,
        world_size=world,
    )


def tiny_ssl(run_dir: str, world: int) -> TinySSL:
    torch.manual_seed(0)
    module = TinySSL(
        backbone={"name": "test_efficientnet"},
        optim={"name": "adamw", "base_lr": 1e-3, "weight_decay": 0.0},
        channels_last=False,
    )
    module._trainer = fake_trainer(run_dir, world)
    module.log = lambda *_, **__: None
    return module


def multitask(run_dir: str, world: int) -> MultiTaskModule:
    torch.manual_seed(0)
    module = MultiTaskModule(
        tasks=load_tasks_config("default"),
        backbone={"name": "test_efficientnet", "pretrained": False, "weights": None},
        optim={"name": "adamw", "base_lr": 1e-3, "weight_decay": 0.0},
        weighting={"name": "fixed"},
        eval_sizes=[SIZE],
        decoder_channels=[64, 32, 16, 16, 8],
        channels_last=False,
    )
    schedule = ResolutionSchedule([{"size": SIZE, "epochs": 1, "batch_size": LOCAL}])
    module._trainer = fake_trainer(run_dir, world, schedule=schedule)
    module.log = lambda *_, **__: None
    module.net.eval()  # running BatchNorm statistics: the same outputs in any batch
    return module


def labeled_batch(seed: int, n: int = LOCAL) -> dict:
    gen = torch.Generator().manual_seed(seed)
    target, present = {}, {}
    for name, flags in PRESENCE.items():
        present[name] = torch.tensor(flags[:n], dtype=torch.bool)
        if name in CLASSES:
            labels = torch.randint(0, CLASSES[name], (n,), generator=gen)
            target[name] = torch.where(present[name], labels, -1)
        else:
            target[name] = (torch.rand(n, 1, SIZE, SIZE, generator=gen) > 0.6).float()
    image = torch.randn(n, 3, SIZE, SIZE, generator=gen)
    return {"image": image, "target": target, "present": present, "index": torch.arange(n)}


ALL_BAD = {"bad_samples": ["a.jpg: broken", "b.jpg: broken"]}


def join_group(rank: int, port: int):
    dist.set_debug_level(dist.DebugLevel.DETAIL)  # a collective mismatch fails, never hangs
    return gloo_group(rank, port, WORLD, GROUP_TIMEOUT)


# -- a non-finite loss on rank 1 only, policy=raise ------------------------------------------
def _fault_worker(rank: int, port: int, app: str, out: str) -> None:
    with join_group(rank, port):
        try:
            for step in range(3):  # each followed by a collective, as DDP's gradient all-reduce
                if app == "pretrain":
                    module = tiny_ssl(out, WORLD)
                    module.poisoned = rank == 1 and step == 1
                    batch = {"views": [torch.randn(LOCAL, 3, SIZE, SIZE)], "bad_samples": []}
                    module.training_step(batch, step)
                else:
                    module = multitask(out, WORLD)
                    batch = labeled_batch(seed=rank)
                    if rank == 1 and step == 1:
                        batch["image"] = batch["image"] * float("nan")
                    module.training_step(batch, step)
                dist.all_reduce(torch.zeros(1))
        except NonFiniteLossError as error:
            (Path(out) / f"rank{rank}.txt").write_text(str(error))
            raise


@pytest.mark.timeout(120)
@pytest.mark.parametrize("app", ["pretrain", "finetune"])
def test_a_nan_on_one_rank_stops_both_at_once_with_one_message(tmp_path, app):
    codes, seconds = fork_ranks(_fault_worker, WORLD, app, str(tmp_path), deadline_s=DEADLINE_S)
    assert None not in codes, f"a rank was still running after {DEADLINE_S} s: {codes}"
    assert all(code != 0 for code in codes), codes
    # Faster than any collective could have timed out.
    assert seconds < GROUP_TIMEOUT.total_seconds(), seconds
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in range(WORLD)]
    assert messages[0] == messages[1], messages
    task = "loss" if app == "pretrain" else "skin"
    assert f"training step {BAD_STEP} in task {task!r} on rank 1" in messages[0], messages[0]
    print(f"{app}: both ranks exited {codes} after {seconds:.1f} s")


# -- the kNN monitor: empty and unequal shards -----------------------------------------------
def knn_batch(seed: int, n: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=gen)
    labels[::3] = -1  # unlabeled for the task
    return {"image": torch.randn(n, 3, SIZE, SIZE, generator=gen), "target": {"blur": labels}}


# Per scenario, per rank: (bank batches, query batches); a bad batch holds no image.
KNN_SCENARIOS = {
    "no_query_on_rank_1": [
        ([knn_batch(1, 4)], [knn_batch(2, 3), knn_batch(3, 2)]),
        ([knn_batch(4, 4)], []),
    ],
    "nothing_on_rank_1": [([knn_batch(1, 5)], [knn_batch(2, 4)]), ([], [])],
    "unequal_under_skip": [
        ([knn_batch(1, 5), knn_batch(5, 3)], [knn_batch(2, 3)]),
        ([knn_batch(4, 2), ALL_BAD], [ALL_BAD, knn_batch(6, 1)]),
    ],
}


def knn_scores(module: TinySSL, loaders: tuple[list, list]) -> dict[str, float]:
    module.eval()
    with torch.no_grad():
        for index, batches in enumerate(loaders):
            for batch_idx, batch in enumerate(batches):
                module.validation_step(batch, batch_idx, index)
    return module._knn_scores("top1")


def one_process_knn(scenario: str) -> dict[str, float]:
    """The same samples in one process, in rank order."""
    ranks = KNN_SCENARIOS[scenario]
    loaders = tuple([b for rank in ranks for b in rank[i]] for i in range(2))
    return knn_scores(tiny_ssl("/tmp/unused", 1), loaders)


def one_process_val() -> dict[str, float]:
    return evaluate(multitask("/tmp/unused", 1), [labeled_batch(10), labeled_batch(11, 3)])


def evaluate(module: MultiTaskModule, batches: list[dict]) -> dict[str, float]:
    logged: dict[str, float] = {}
    module.log = lambda name, value, **_: logged.__setitem__(name, float(value))
    module.eval()
    with torch.no_grad():
        for batch in batches:
            module._eval_step(batch, 0)
        module._log_eval("val")
    return logged


def _pass_worker(rank: int, port: int, out: str) -> None:
    with join_group(rank, port):
        result = {
            name: knn_scores(tiny_ssl(out, WORLD), ranks[rank])
            for name, ranks in KNN_SCENARIOS.items()
        }
        # Validation: rank 1's whole shard is bad (two batches, as many as rank 0's).
        shard = [labeled_batch(10), labeled_batch(11, 3)] if rank == 0 else [ALL_BAD, ALL_BAD]
        result["val"] = evaluate(multitask(out, WORLD), shard)
        torch.save(result, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def passes(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("rank_faults")
    codes, seconds = fork_ranks(_pass_worker, WORLD, str(out), deadline_s=DEADLINE_S)
    assert codes == [0, 0], f"exit codes {codes} after {seconds:.1f} s"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("scenario", sorted(KNN_SCENARIOS))
def test_knn_monitor_with_empty_or_unequal_shards_equals_one_process(passes, scenario):
    single = one_process_knn(scenario)
    assert "knn/blur/top1" in single and "knn/blur/majority" in single, single
    for rank in range(WORLD):
        assert passes[rank][scenario] == pytest.approx(single), (rank, passes[rank][scenario])


@pytest.mark.timeout(120)
def test_validation_with_a_wholly_bad_shard_logs_what_one_process_logs(passes):
    single = one_process_val()
    assert "val/32/global/loss" in single
    for rank in range(WORLD):
        assert set(passes[rank]["val"]) == set(single)
        for key, value in single.items():
            assert passes[rank]["val"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


# -- the same under the app: a Lightning DDP run on 2 CPU processes --------------------------
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("app", ["finetune", "pretrain"])
def test_a_ddp_run_with_a_nan_on_rank_1_stops_with_one_message_per_rank(
    synthetic_root, tmp_path, reaper, app
):
    import re
    import time

    from reliability_helpers import app_command, launch, tiny_overrides

    stages = "schedule.stages=[{size:32,epochs:1,batch_size:4}]"
    overrides = [
        *tiny_overrides(app, synthetic_root, stages),
        "trainer=ddp_cpu",
        "trainer.strategy.timeout.minutes=5",  # a rank left waiting would take that long
        "nonfinite.policy=raise",
        "+callbacks.nan={_target_: reliability_probes.NaNImagesOnRank, rank: 1, batch: 2}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    log = tmp_path / "run.out"
    start = time.monotonic()
    process = launch(app_command(app, *overrides), tmp_path, log, reaper)
    process.wait(timeout=280)
    seconds = time.monotonic() - start
    text = log.read_text()
    assert process.returncode != 0, text[-4000:]
    assert seconds < 5 * 60, seconds
    messages = re.findall(r"NonFiniteLossError: (non-finite loss at training step [^\n]*)", text)
    # One per rank (each prints its traceback), word for word the same.
    assert len(messages) == 2 and len(set(messages)) == 1, text[-6000:]
    assert "training step 2 in task" in messages[0], messages
    # Fine-tuning: rank 1 alone. SimCLR: NT-Xent's negatives carry rank 1's NaN to rank 0.
    ranks = "rank 1 " if app == "finetune" else "ranks 0, 1 "
    assert f"on {ranks}(every rank stops" in messages[0], messages
    print(f"{app}: exit {process.returncode} after {seconds:.1f} s (imports included)")
