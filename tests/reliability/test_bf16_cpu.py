"""One epoch of pretraining and one of fine-tuning under ``trainer.precision=bf16-mixed`` on
the CPU (Lightning's CPU autocast to bfloat16): what GPUs run by default (``trainer=gpu``,
``trainer=ddp``), on the quick profile at 32 px. The runs must finish with finite losses."""

from __future__ import annotations

import math

import pytest
from reliability_helpers import per_epoch, read_metrics, run_app, tiny_cfg

BF16 = ["trainer.accelerator=cpu", "trainer.precision=bf16-mixed"]
STAGES = "schedule.stages=[{size:32,epochs:1,batch_size:8}]"  # 5 steps
LOSS = {"pretrain": "train/loss", "finetune": "train/global/loss"}


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("app", ["pretrain", "finetune"])
def test_one_bf16_mixed_epoch_on_the_cpu(synthetic_root, tmp_path, app):
    cfg = tiny_cfg(app, synthetic_root, tmp_path, STAGES, *BF16)
    assert cfg.trainer.precision == "bf16-mixed"
    run_app(app, cfg)
    losses = per_epoch(read_metrics(tmp_path), LOSS[app])
    assert set(losses) == {0}
    assert math.isfinite(losses[0]), losses
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
