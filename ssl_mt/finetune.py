"""Multi-task fine-tuning app: ``python -m ssl_mt.finetune [hydra overrides]``.

Composes ``conf/finetune.yaml``; the encoder starts random, from timm's hub
(``backbone.pretrained=true``) or from an SSL export (``backbone.weights=PATH``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from ssl_mt.config import CONF_DIR
from ssl_mt.console import stop_on_bad_sample
from ssl_mt.evaluation.evaluate import write_eval_records
from ssl_mt.models.backbone import initial_state
from ssl_mt.runner import build_trainer, plain, prepare_resume, prepare_run, resolve_ckpt_path
from ssl_mt.shutdown import freeze_heap_at_exit

log = logging.getLogger(__name__)


def check_backbone_init(cfg: DictConfig) -> None:
    """An experiment that promises SSL weights (``mt_ssl``) must be given them."""
    if cfg.require_backbone_weights and not cfg.backbone.weights:
        raise ValueError(
            f"experiment={cfg.experiment_name} needs backbone.weights=PATH: the "
            "backbone/ folder written by `python -m ssl_mt.pretrain`"
        )


def build_module(cfg: DictConfig, init_weights: bool = True):
    """The :class:`~ssl_mt.models.multitask.MultiTaskModule` of ``cfg.model``.

    ``init_weights``: start the encoder from ``backbone.weights`` / ``backbone.pretrained``
    (a new run); a resumed run takes every tensor from its checkpoint instead, so it needs
    neither the weights file nor the network.
    """
    check_backbone_init(cfg)
    module = instantiate(
        plain(cfg.model),
        tasks=plain(cfg.tasks),
        backbone=plain(cfg.backbone),
        optim=plain(cfg.optim),
        weighting=plain(cfg.weighting),
        eval_sizes=list(cfg.schedule.eval_sizes),
        channels_last=cfg.channels_last,
        compile=cfg.compile,
        nonfinite=plain(cfg.nonfinite),
        preprocess={
            "mean": list(cfg.augment.mean),
            "std": list(cfg.augment.std),
            "size": int(cfg.schedule.stages[-1].size),  # the inference size of predict
        },
        _recursive_=False,
        _convert_="all",  # plain containers in the checkpoint's hyper-parameters
    )
    init = initial_state(plain(cfg.backbone)) if init_weights else None
    if init is not None:
        module.init_encoder(*init)
    return module


def run(cfg: DictConfig) -> Path:
    """Trains, evaluates the best checkpoint on the test split when there is one, then writes
    the per-image evaluation records of the best and last checkpoints (``eval_records``)."""
    check_backbone_init(cfg)
    ckpt_path = resolve_ckpt_path(cfg)  # may move cfg.run_dir to the run it continues
    run_dir = prepare_run(cfg)
    prepare_resume(cfg, ckpt_path)
    datamodule = instantiate(cfg.data, _recursive_=False, _convert_="all")
    datamodule.setup("fit")  # manifest errors surface now, before any model is built
    module = build_module(cfg, init_weights=ckpt_path is None)
    trainer = build_trainer(cfg)
    trusted = bool(cfg.trust_checkpoint)  # else every checkpoint loads weights-only
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=not trusted)
    if cfg.test_after_fit and datamodule.samples.get("test"):
        trainer.test(module, datamodule=datamodule, ckpt_path="best", weights_only=not trusted)
    if cfg.eval_records:
        write_eval_records(trainer, module, datamodule, run_dir, trust=trusted)
    return run_dir


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="finetune")
def main(cfg: DictConfig) -> None:
    with stop_on_bad_sample(cfg.data.root):
        run(cfg)


if __name__ == "__main__":
    freeze_heap_at_exit()
    main()
