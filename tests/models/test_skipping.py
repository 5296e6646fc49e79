"""A skipped training step: a zero gradient on every parameter, and no optimiser step.

Under DDP Lightning refuses a ``training_step`` that returns None, so a skipped step returns
a zero loss attached to every parameter (backward, and DDP's all-reduce, run on every rank)
and the module's ``optimizer_step`` leaves the step out.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ssl_mt.models.simclr import SimCLRModule
from ssl_mt.models.skipping import optimizer_step_unless_skipped, skip_step, zero_loss
from tests.gloo import start_ranks


def make_simclr() -> SimCLRModule:
    return SimCLRModule(
        projection={"hidden_dim": 32, "out_dim": 16},
        temperature=0.2,
        backbone={"name": "test_efficientnet"},
        optim={"name": "sgd", "base_lr": 0.1, "weight_decay": 0.0},
        channels_last=False,
    )


class CountingOptimizer:
    def __init__(self) -> None:
        self.steps = 0

    def step(self, closure) -> None:
        closure()
        self.steps += 1


def test_zero_loss_gives_every_trainable_parameter_an_exact_zero_gradient():
    module = make_simclr()
    zero_loss(module).backward()
    for name, p in module.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and not p.grad.any(), name


def test_an_all_bad_ssl_batch_is_a_skipped_step_not_a_key_error():
    module = make_simclr()
    module._trainer = SimpleNamespace(datamodule=SimpleNamespace(on_bad_sample="skip"))
    loss = module.training_step({"bad_samples": ["images/x.jpg: unreadable"]}, 0)
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    optimizer, calls = CountingOptimizer(), []
    module.optimizer_step(0, 0, optimizer, lambda: calls.append(1))
    assert calls == [1] and optimizer.steps == 0, "the closure runs, the optimiser does not"
    # The next (good) step steps again.
    optimizer_step_unless_skipped(module, optimizer, lambda: torch.tensor(1.0))
    assert optimizer.steps == 1


def test_a_skip_in_any_micro_batch_leaves_out_its_window_step():
    module = make_simclr()
    optimizer = CountingOptimizer()
    skip_step(module)  # an early micro-batch of the window
    module.optimizer_step(0, 1, optimizer, lambda: None)  # the window's last
    assert optimizer.steps == 0
    module.optimizer_step(0, 3, optimizer, lambda: None)
    assert optimizer.steps == 1


# -- 2 gloo processes: one meets an all-bad SSL batch -------------------------------------------
def _ssl_rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    timeout = timedelta(seconds=60)
    store = dist.TCPStore("127.0.0.1", port, 3, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timeout)
    try:
        torch.manual_seed(0)
        module = make_simclr()
        module._trainer = SimpleNamespace(datamodule=SimpleNamespace(on_bad_sample="skip"))
        views = [
            torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(v)) for v in (1, 2)
        ]
        batch = {"views": views, "bad_samples": []} if rank == 0 else {"bad_samples": ["x: bad"]}
        loss = module.training_step(batch, 0)
        loss.backward()
        for p in module.parameters():  # DDP's gradient average
            dist.all_reduce(p.grad)
        torch.save(
            {"loss": float(loss.detach()), "skip": module._skip_optimizer_step},
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_an_all_bad_ssl_batch_on_one_rank_skips_the_step_on_both(tmp_path):
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, 3, is_master=True, wait_for_workers=False)
    start_ranks(_ssl_rank, 2, store.port, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # Rank 0's good batch is skipped too: NT-Xent gathers equal-sized batches from every rank.
    assert ranks == [{"loss": 0.0, "skip": True}] * 2
