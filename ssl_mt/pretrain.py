"""Self-supervised pretraining app: ``python -m ssl_mt.pretrain [hydra overrides]``.

Composes ``conf/pretrain.yaml``, trains the configured method (SimCLR by default) and
exports the backbone as the folder ``RUN/backbone/`` in timm's hub layout (``config.json`` +
``model.safetensors``; rank 0 only): ``timm.create_model("local-dir:RUN/backbone",
pretrained=True)`` loads it, and so does ``backbone.weights=RUN/backbone`` of fine-tuning.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from ssl_mt.config import CONF_DIR
from ssl_mt.console import stop_on_bad_sample
from ssl_mt.models.backbone import architecture_args, export_backbone, initial_state
from ssl_mt.runner import (
    backbone_kwargs,
    build_trainer,
    plain,
    prepare_resume,
    prepare_run,
    resolve_ckpt_path,
)
from ssl_mt.shutdown import freeze_heap_at_exit

log = logging.getLogger(__name__)


def build_module(cfg: DictConfig, init_weights: bool = True):
    """The pretraining LightningModule of ``cfg.method``.

    ``init_weights``: start the backbone from ``backbone.weights`` / ``backbone.pretrained``
    (a new run); a resumed run takes every tensor from its checkpoint instead.
    """
    module = instantiate(
        plain(cfg.method),
        backbone=backbone_kwargs(cfg.backbone),
        optim=plain(cfg.optim),
        channels_last=cfg.channels_last,
        compile=cfg.compile,
        nonfinite=plain(cfg.nonfinite),
        image_size=int(cfg.schedule.stages[-1].size),
        _recursive_=False,
        _convert_="all",  # plain containers in the checkpoint's hyper-parameters
    )
    init = initial_state(plain(cfg.backbone)) if init_weights else None
    if init is not None:
        module.init_backbone(*init)
    return module


def run(cfg: DictConfig) -> Path:
    """Trains and exports; returns the run directory."""
    ckpt_path = resolve_ckpt_path(cfg)  # may move cfg.run_dir to the run it continues
    run_dir = prepare_run(cfg)
    prepare_resume(cfg, ckpt_path)
    datamodule = instantiate(cfg.data, _recursive_=False, _convert_="all")
    datamodule.setup("fit")  # manifest errors surface now, before any model is built
    module = build_module(cfg, init_weights=ckpt_path is None)
    trainer = build_trainer(cfg)
    trusted = bool(cfg.trust_checkpoint)  # else the checkpoint loads weights-only
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=not trusted)
    if trainer.is_global_zero:
        out = export_backbone(
            module.backbone,
            cfg.backbone.name,
            run_dir / cfg.export_name,
            image_size=module.image_size,
            mean=tuple(cfg.augment.mean),
            std=tuple(cfg.augment.std),
            model_args=architecture_args(plain(cfg.backbone)),
            extra={
                "method": cfg.method._target_.rsplit(".", 1)[-1],
                "epochs": trainer.current_epoch,
            },
        )
        log.info("exported backbone to %s", out)
    return run_dir


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="pretrain")
def main(cfg: DictConfig) -> None:
    with stop_on_bad_sample(cfg.data.root):
        run(cfg)


if __name__ == "__main__":
    freeze_heap_at_exit()
    main()
