"""A finished run resumed with more epochs follows the lr plan of its new config.

Run A trains 2 epochs; the same run directory is then re-run with 4 epochs
(``ckpt_path=auto``), as one does to "train 100 more epochs". From the resumed step on, the
logged learning rate of every parameter group must be the one a fresh 4-epoch run logs at
the same steps — not the 2-epoch plan's (whose cosine has already reached its end).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
from reliability_helpers import read_metrics, run_app, tiny_cfg

pytestmark = pytest.mark.slow

# Every step's lr in metrics.csv; warmup over the first epoch, then the cosine.
LR_EVERY_STEP = [
    "callbacks.lr_monitor.logging_interval=step",
    "trainer.log_every_n_steps=1",
    "trainer.deterministic=true",
    "optim.warmup_epochs=1",
    "optim.min_lr_ratio=0.0",
    "ckpt_path=auto",
]


def _stages(epochs: int) -> str:
    return f"schedule.stages=[{{size:32,epochs:{epochs},batch_size:8}}]"


def _lrs(run_dir: Path) -> dict[tuple[int, str], float]:
    df = read_metrics(run_dir)
    columns = [c for c in df.columns if c.startswith("lr-")]
    assert columns, "no lr-* column in metrics.csv"
    out = {}
    for column in columns:
        for _, row in df[df[column].notna()].iterrows():
            out[(int(row["step"]), column)] = float(row[column])
    return out


@pytest.mark.parametrize("app", ["finetune"])
def test_a_finished_run_resumed_with_more_epochs_follows_the_new_plan(
    synthetic_root, tmp_path, app, caplog
):
    fresh, resumed = tmp_path / "fresh", tmp_path / "resumed"
    run_app(app, tiny_cfg(app, synthetic_root, fresh, _stages(4), *LR_EVERY_STEP))
    run_app(app, tiny_cfg(app, synthetic_root, resumed, _stages(2), *LR_EVERY_STEP))
    first = _lrs(resumed)
    resume_step = max(step for step, _ in first) + 1
    with caplog.at_level(logging.INFO, logger="ssl_mt.lr_plan"):
        run_app(app, tiny_cfg(app, synthetic_root, resumed, _stages(4), *LR_EVERY_STEP))

    steps_per_epoch = resume_step // 2
    expected, got = _lrs(fresh), _lrs(resumed)
    after = {k: v for k, v in expected.items() if k[0] >= resume_step}
    assert after, "the fresh run logged nothing after the resume step"
    assert {k for k in got if k[0] >= resume_step} == after.keys()
    for key, value in after.items():
        assert math.isclose(got[key], value, rel_tol=1e-12, abs_tol=0.0), (
            f"{key}: resumed {got[key]} != fresh {value}"
        )
    assert f"total steps {2 * steps_per_epoch} -> {4 * steps_per_epoch}" in caplog.text
    # Before the resume the two plans differ (shorter cosine): the check above is not trivial.
    assert any(
        not math.isclose(first[k], expected[k], rel_tol=1e-9)
        for k in first
        if k[0] >= steps_per_epoch
    )
