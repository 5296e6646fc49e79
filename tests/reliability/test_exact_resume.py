"""A run stopped at an epoch boundary and resumed ends bit-identical to an uninterrupted one.

Deterministic CPU runs (``trainer.deterministic=true``, fixed seed): run A trains the whole
schedule; run B is stopped after epoch ``j`` (the end-of-epoch checkpoint is written, as
when a job is killed between epochs) and re-run with the same command (``ckpt_path=auto``).
Weights and validation metrics must match exactly: the resumed run restores the weights,
the optimiser, the lr schedule, the progressive stage, the data order, the per-sample
augmentations AND the random state (dropout) it would have had.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from reliability_helpers import PROBES, read_metrics, run_app, tiny_cfg

pytestmark = pytest.mark.slow

# Stage switch after the resume point: the resumed run must build the stage-2 loader itself.
STAGES = {
    "finetune": "schedule.stages=[{size:32,epochs:1,batch_size:8},{size:64,epochs:2,batch_size:8}]",
    "pretrain": "schedule.stages=[{size:32,epochs:1,batch_size:8},{size:48,epochs:2,batch_size:8}]",
}


def _cfg(app: str, root: Path, run_dir: Path, *extra: str):
    return tiny_cfg(
        app,
        root,
        run_dir,
        STAGES[app],
        "trainer.deterministic=true",
        "seed=3",
        "ckpt_path=auto",
        *extra,
    )


def _final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 2
    return state["state_dict"]


def _epoch_values(run_dir: Path, prefix: str) -> dict[tuple[int, str], float]:
    df = read_metrics(run_dir)
    columns = [c for c in df.columns if c.startswith(prefix)]
    assert columns, f"no {prefix}* column"
    out = {}
    for column in columns:
        for _, row in df[df[column].notna()].iterrows():
            key = (int(row["epoch"]), column)
            assert key not in out, f"{key} logged twice"
            out[key] = float(row[column])
    return out


@pytest.mark.parametrize(
    ("app", "num_workers"),
    [("finetune", 0), ("finetune", 1), ("pretrain", 0)],
)
def test_resume_at_an_epoch_boundary_reproduces_the_uninterrupted_run(
    synthetic_root, tmp_path, app, num_workers
):
    workers = [f"data.num_workers={num_workers}"]
    a, b = tmp_path / "a", tmp_path / "b"
    run_app(app, _cfg(app, synthetic_root, a, *workers))
    stop = f"+callbacks.stop={{_target_:{PROBES}.StopAfterEpoch,epoch:0}}"
    run_app(app, _cfg(app, synthetic_root, b, *workers, stop))
    assert torch.load(b / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0
    run_app(app, _cfg(app, synthetic_root, b, *workers))  # the same command, resumed

    state_a, state_b = _final_state(a), _final_state(b)
    assert state_a.keys() == state_b.keys()
    differ = [k for k in state_a if not torch.equal(state_a[k], state_b[k])]
    assert not differ, f"{len(differ)} tensors differ after the resume, e.g. {differ[:5]}"

    prefix = "val/" if app == "finetune" else "knn/"
    for part in (prefix, "train/"):
        va, vb = _epoch_values(a, part), _epoch_values(b, part)
        skip = {"train/epoch_time_s", "train/images_per_s"}  # wall-clock
        va = {k: v for k, v in va.items() if k[1] not in skip}
        vb = {k: v for k, v in vb.items() if k[1] not in skip}
        assert va.keys() == vb.keys()
        assert {k[0] for k in va} == {0, 1, 2}
        for key, value in va.items():
            assert math.isclose(value, vb[key], rel_tol=1e-6, abs_tol=1e-7) or (
                math.isnan(value) and math.isnan(vb[key])
            ), f"{key}: {value} != {vb[key]}"
