"""The multi-task LightningModule: partial labels, loss weighting, per-resolution metrics.

Logged keys (``RES`` = evaluation size, ``T`` = task):
- ``train/T/loss``, ``train/global/loss`` (unweighted sum), ``train/total_loss`` (weighted,
  the backpropagated one), ``weights/T`` (effective weights), per epoch;
- ``val/RES/T/loss`` and ``val/RES/T/<metric>``, ``val/RES/global/loss`` (the unweighted
  sum of task losses, comparable across weightings), per epoch and resolution.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from ssl_mt.losses.task_losses import build_task_loss
from ssl_mt.losses.weighting import build_weighting
from ssl_mt.lr_plan import lambda_scheduler, plan_lr, trainer_world
from ssl_mt.models.multitask_net import MultiTaskNet
from ssl_mt.models.nonfinite import NonFiniteGuard, guard_step
from ssl_mt.models.ssl_base import to_channels_last
from ssl_mt.models.task_metrics import step_mean, task_metrics, update_task_metrics
from ssl_mt.optim import build_optimizer, decay_groups
from ssl_mt.tasks import parse_tasks

log = logging.getLogger(__name__)


class MultiTaskModule(L.LightningModule):
    """Fine-tunes a shared encoder with segmentation and classification heads.

    Args:
        tasks: The ``tasks`` config.
        backbone: The ``backbone`` config (``name``, ``pretrained``, ``weights``,
            ``grad_checkpointing``, ``drop_path_rate``).
        optim: The ``optim`` config (also ``backbone_lr_scale``, ``freeze_backbone_epochs``).
        weighting: The ``weighting`` config (``name`` plus the strategy's arguments).
        arch: segmentation_models_pytorch architecture of the decoder.
        decoder_channels: Decoder widths (U-Net family).
        head_dropout: Dropout of the classification heads.
        eval_sizes: Evaluation resolutions, in the order of the validation loaders.
        channels_last: NHWC memory format.
        compile: ``torch.compile(dynamic=False)``: one static graph per input shape.
        nonfinite: NaN/Inf loss handling (``policy``: raise | skip, ``check_every_n_steps``).
    """

    def __init__(
        self,
        tasks: Mapping[str, Any],
        backbone: Mapping[str, Any],
        optim: Mapping[str, Any],
        weighting: Mapping[str, Any],
        eval_sizes: list[int],
        arch: str = "unet",
        decoder_channels: list[int] | None = None,
        head_dropout: float = 0.2,
        channels_last: bool = True,
        compile: bool = False,
        nonfinite: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tasks = parse_tasks(tasks)
        self.optim_cfg = dict(optim)
        self.eval_sizes = [int(s) for s in eval_sizes]
        self.channels_last = channels_last
        self.compile_model = compile
        backbone = dict(backbone)
        handled = {
            "name",
            "pretrained",
            "weights",
            "grad_checkpointing",
            "drop_path_rate",
            "decoder_channels",
        }
        self.net = MultiTaskNet(
            backbone["name"],
            self.tasks,
            arch=arch,
            decoder_channels=decoder_channels,
            pretrained=bool(backbone.get("pretrained", False)),
            head_dropout=head_dropout,
            drop_path_rate=float(backbone.get("drop_path_rate") or 0.0),
            # Any other backbone key is a timm argument, as in pretraining.
            **{k: v for k, v in backbone.items() if k not in handled},
        )
        self.encoder_tensors_loaded = 0
        if backbone.get("pretrained") and backbone.get("weights"):
            raise ValueError("choose backbone.pretrained=true OR backbone.weights=PATH, not both")
        if backbone.get("weights"):
            self.encoder_tensors_loaded, _ = self.net.load_encoder_weights(backbone["weights"])
        if backbone.get("grad_checkpointing"):
            self.net.set_grad_checkpointing(True)
        self.losses = nn.ModuleDict({t.name: build_task_loss(t) for t in self.tasks})
        weighting = dict(weighting)
        self.weighting = build_weighting(
            weighting.pop("name"),
            [t.name for t in self.tasks],
            {t.name: t.loss_weight for t in self.tasks},
            **weighting,
        )
        self.nonfinite = NonFiniteGuard(**dict(nonfinite or {}))
        self.train_task_loss = nn.ModuleDict({t.name: step_mean() for t in self.tasks})
        self.train_weight = nn.ModuleDict({t.name: step_mean() for t in self.tasks})
        self.train_total = step_mean()
        self.val_metrics = nn.ModuleDict(
            {
                str(size): nn.ModuleDict({t.name: task_metrics(t) for t in self.tasks})
                for size in self.eval_sizes
            }
        )

    # -- model ----------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if self.compile_model:
            from torch import _dynamo

            # One graph per (size, batch, train/eval): allow them all, never go dynamic.
            limit = 8 * (len(self.eval_sizes) + 2)
            _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, limit)
            self.net.compile(dynamic=False)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.net(to_channels_last(images, self.channels_last))

    def task_losses(
        self, outputs: Mapping[str, Tensor], batch: Mapping[str, Any]
    ) -> dict[str, Tensor]:
        return {
            t.name: self.losses[t.name](
                outputs[t.name], batch["target"][t.name], batch["present"][t.name]
            )
            for t in self.tasks
        }

    # -- training ---------------------------------------------------------------------------
    @property
    def freeze_epochs(self) -> int:
        return int(self.optim_cfg.get("freeze_backbone_epochs", 0) or 0)

    def on_train_epoch_start(self) -> None:
        # A frozen encoder (lr 0) also keeps its BatchNorm statistics. Set the mode every
        # epoch: validation restores the modes it found, so an encoder left in eval mode
        # would stay there (frozen BatchNorm statistics) for the rest of the run.
        self.net.encoder.train(self.current_epoch >= self.freeze_epochs)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor | None:
        if "image" not in batch:  # every sample of the batch was skipped as bad
            return None
        outputs = self(batch["image"])
        losses = self.task_losses(outputs, batch)
        if guard_step(self, losses):
            return None
        present = {name: flags.any() for name, flags in batch["present"].items()}
        total, weights = self.weighting(losses, present)
        batch_size = batch["image"].shape[0]
        for t in self.tasks:
            self.train_task_loss[t.name].update(
                losses[t.name].detach(), weight=batch["present"][t.name].sum()
            )
            self.train_weight[t.name].update(weights[t.name])
        self.train_total.update(total.detach())
        self.log(
            "train/loss_step", total.detach(), prog_bar=True, logger=False, batch_size=batch_size
        )
        return total

    def on_train_epoch_end(self) -> None:
        means = {}
        for t in self.tasks:
            means[t.name] = self.train_task_loss[t.name].compute()
            self.log(f"train/{t.name}/loss", means[t.name])
            self.log(f"weights/{t.name}", self.train_weight[t.name].compute())
            self.train_task_loss[t.name].reset()
            self.train_weight[t.name].reset()
        self.log("train/global/loss", torch.stack(list(means.values())).sum())
        self.log("train/total_loss", self.train_total.compute())
        self.train_total.reset()
        self.weighting.epoch_end({name: float(value) for name, value in means.items()})

    # -- validation / test ------------------------------------------------------------------
    def _eval_step(self, batch: Mapping[str, Any], dataloader_idx: int) -> None:
        if "image" not in batch:
            return
        outputs = self(batch["image"])
        losses = self.task_losses(outputs, batch)
        metrics = self.val_metrics[str(self.eval_sizes[dataloader_idx])]
        for t in self.tasks:
            update_task_metrics(
                metrics[t.name],
                t,
                outputs[t.name],
                batch["target"][t.name],
                batch["present"][t.name],
                losses[t.name],
            )

    def validation_step(
        self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._eval_step(batch, dataloader_idx)

    def test_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def _log_eval(self, prefix: str) -> None:
        for size, per_task in self.val_metrics.items():
            task_losses = []
            for t in self.tasks:
                for name, metric in per_task[t.name].items():
                    if metric.update_count == 0:
                        continue  # no labeled sample at all: nothing to report
                    value = metric.compute()
                    self.log(f"{prefix}/{size}/{t.name}/{name}", value, add_dataloader_idx=False)
                    if name == "loss":
                        task_losses.append(value)
                    metric.reset()
            if task_losses:
                self.log(
                    f"{prefix}/{size}/global/loss",
                    torch.stack(task_losses).sum(),
                    add_dataloader_idx=False,
                )

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    # -- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        datamodule = self.trainer.datamodule
        world, accumulate = trainer_world(self.trainer)
        lr, multiplier = plan_lr(
            self.optim_cfg,
            datamodule.schedule,
            datamodule.num_train_samples,
            world,
            accumulate,
            freeze_epochs=self.freeze_epochs,
        )
        decay = self.optim_cfg["weight_decay"]
        groups = decay_groups(
            self.net.encoder,
            decay,
            lr_scale=float(self.optim_cfg.get("backbone_lr_scale", 1.0)),
            tag="backbone",
        )
        heads = [
            getattr(self.net, name)
            for name in ("decoder", "segmentation_head", "heads")
            if getattr(self.net, name) is not None
        ]
        groups += decay_groups(heads, decay, tag="head")
        groups += decay_groups(self.weighting, 0.0, tag="weighting")
        optimizer = build_optimizer(groups, self.optim_cfg, lr)
        scheduler = lambda_scheduler(optimizer, multiplier)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
