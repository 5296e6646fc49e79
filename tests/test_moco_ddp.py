"""MoCo under 2-process gloo DDP: the queue holds the keys of every rank, the same everywhere.

Also Shuffling BN's cross-rank shuffle: it mixes the ranks' images and undoes itself. The
bug it catches: a shuffle that leaves every rank its own batch (a no-op, e.g. ``(x, None)``),
which a "permutation that undoes itself" check alone cannot see.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ssl_mt.losses.info_nce import KeyQueue, batch_shuffle, batch_unshuffle
from tests.gloo import gloo_group, spawn_gloo

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
BATCH = 3
DIM = 4
QUEUE = 2 * WORLD * BATCH  # two steps of both ranks fill it exactly
SHUFFLES = 4  # draws of the shuffle: a no-op is told from an unlucky identity permutation
STORE_TIMEOUT = timedelta(seconds=60)


def rank_keys(rank: int, step: int) -> torch.Tensor:
    """Distinct unit keys per (rank, step): row r of step s of rank k is recognisable."""
    keys = torch.randn(BATCH, DIM, generator=torch.Generator().manual_seed(100 * step + rank))
    return torch.nn.functional.normalize(keys, dim=1)


def _worker(rank: int, port: int, out_dir: str) -> None:
    with gloo_group(rank, port, WORLD, STORE_TIMEOUT):
        torch.manual_seed(0)  # the same random initial queue on both ranks, as seed_everything
        queue = KeyQueue(QUEUE, DIM)
        snapshots = []
        for step in range(3):  # the third step wraps around
            queue.enqueue(rank_keys(rank, step))
            snapshots.append((queue.keys.clone(), queue.ptr.clone()))

        images = torch.arange(BATCH * 2, dtype=torch.float32).view(BATCH, 2) + 100 * rank
        shuffled, restored = [], []
        for _ in range(SHUFFLES):
            batch, unshuffle = batch_shuffle(images)
            shuffled.append(batch)
            restored.append(batch_unshuffle(batch * 2, unshuffle))  # "the encoder" doubles
        torch.save(
            {
                "snapshots": snapshots,
                "images": images,
                "shuffled": shuffled,
                "restored": restored,
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
        dist.barrier()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("moco_ddp")
    with pytest.MonkeyPatch.context() as patch:
        # The spawned processes import this module by name: make the repository importable.
        patch.syspath_prepend(str(ROOT))
        spawn_gloo(_worker, WORLD, str(out))
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_queue_holds_the_keys_of_both_ranks_in_rank_order(ranks):
    for rank, result in enumerate(ranks):
        keys, ptr = result["snapshots"][0]
        torch.testing.assert_close(keys[:BATCH], rank_keys(0, 0), msg=f"rank {rank}")
        torch.testing.assert_close(keys[BATCH : 2 * BATCH], rank_keys(1, 0), msg=f"rank {rank}")
        assert ptr.item() == WORLD * BATCH

        keys, ptr = result["snapshots"][1]
        expected = torch.cat([rank_keys(0, 0), rank_keys(1, 0), rank_keys(0, 1), rank_keys(1, 1)])
        torch.testing.assert_close(keys, expected, msg=f"rank {rank}")
        assert ptr.item() == 0  # full: the pointer wrapped

        keys, ptr = result["snapshots"][2]  # the oldest keys are replaced first
        expected = torch.cat([rank_keys(0, 2), rank_keys(1, 2), rank_keys(0, 1), rank_keys(1, 1)])
        torch.testing.assert_close(keys, expected, msg=f"rank {rank}")
        assert ptr.item() == WORLD * BATCH


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_queue_is_identical_on_every_rank(ranks):
    for step in range(3):
        keys0, ptr0 = ranks[0]["snapshots"][step]
        keys1, ptr1 = ranks[1]["snapshots"][step]
        assert torch.equal(keys0, keys1), f"step {step}"
        assert torch.equal(ptr0, ptr1), f"step {step}"


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_shuffling_bn_mixes_ranks_and_is_undone(ranks):
    """Catches a no-op shuffle: every rank's key batch must hold images of the other rank."""
    everything = torch.cat([r["images"] for r in ranks])
    for draw in range(SHUFFLES):
        shuffled = torch.cat([r["shuffled"][draw] for r in ranks])
        # A permutation of the global batch, spread over both ranks.
        assert sorted(shuffled[:, 0].tolist()) == sorted(everything[:, 0].tolist()), draw
        for rank, result in enumerate(ranks):
            restored = result["restored"][draw]
            torch.testing.assert_close(restored, 2 * result["images"], msg=f"rank {rank}")
    for rank, result in enumerate(ranks):
        own = set(result["images"][:, 0].tolist())
        foreign = [sum(v not in own for v in batch[:, 0].tolist()) for batch in result["shuffled"]]
        # Each draw may keep a rank's batch by chance (1 in 10 here), never all of them.
        assert any(foreign), f"rank {rank} never got an image of the other rank: {foreign}"
    draws = {
        tuple(torch.cat([r["shuffled"][d] for r in ranks])[:, 0].tolist()) for d in range(SHUFFLES)
    }
    assert len(draws) > 1, "every draw is the same permutation"
