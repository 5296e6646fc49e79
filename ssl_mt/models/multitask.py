"""The multi-task LightningModule: partial labels, loss weighting, per-resolution metrics.

Logged keys (``RES`` = evaluation size, ``T`` = task):
- ``train/T/loss``, ``train/global/loss`` (unweighted sum), ``train/total_loss`` (weighted,
  the backpropagated one), ``weights/T`` (effective weights), per epoch;
- ``val/RES/T/loss`` and ``val/RES/T/<metric>``, ``val/RES/global/loss`` (the unweighted
  sum of task losses, comparable across weightings), per epoch and resolution.

Under DDP every reduction is global: a task's training loss is the mean over its labeled
samples of the whole global batch (:mod:`ssl_mt.losses.global_mean`), evaluation metrics
are reduced over the ranks, and every rank makes the same collective calls in the same
order whatever its shard held (a rank whose batch was all bad trains on an empty batch; a
task labeled on no rank is left out of the global loss, named once in the log).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from ssl_mt.losses.global_mean import global_task_losses, labeled_sums
from ssl_mt.losses.task_losses import build_task_loss, masked_mean
from ssl_mt.losses.weighting import FAMO, build_weighting
from ssl_mt.lr_plan import lambda_scheduler, plan_lr, trainer_world
from ssl_mt.models.compilation import raise_recompile_limit
from ssl_mt.models.multitask_net import MultiTaskNet
from ssl_mt.models.nonfinite import NonFiniteGuard, guard_step, rank_flags
from ssl_mt.models.skipping import optimizer_step_unless_skipped, skip_step
from ssl_mt.models.ssl_base import to_channels_last
from ssl_mt.models.task_metrics import (
    labeled_counts,
    log_task_metrics,
    step_mean,
    task_metrics,
    update_task_metrics,
)
from ssl_mt.optim import build_optimizer, decay_groups
from ssl_mt.safe_loading import plain_hyper_parameters
from ssl_mt.sync_batchnorm import empty_batch_statistics
from ssl_mt.tasks import parse_tasks

log = logging.getLogger(__name__)


@dataclass
class TrainingLoss:
    """One training step's loss: the weighted total (backpropagated), the effective weights,
    and this rank's labeled per-task loss sums and counts (for the epoch means)."""

    total: Tensor
    weights: dict[str, Tensor]
    sums: dict[str, Tensor]
    counts: dict[str, Tensor]
    batch_size: int


class MultiTaskModule(L.LightningModule):
    """Fine-tunes a shared encoder with segmentation and classification heads.

    Args:
        tasks: The ``tasks`` config.
        backbone: The ``backbone`` config (``name``, ``grad_checkpointing``,
            ``drop_path_rate``; ``pretrained`` and ``weights`` are recorded, not loaded: see
            :meth:`init_encoder`).
        optim: The ``optim`` config (also ``backbone_lr_scale``, ``freeze_backbone_epochs``).
        weighting: The ``weighting`` config (``name`` plus the strategy's arguments).
        arch: segmentation_models_pytorch architecture of the decoder.
        decoder_channels: Decoder widths (U-Net family).
        head_dropout: Dropout of the classification heads.
        eval_sizes: Evaluation resolutions, in the order of the validation loaders.
        channels_last: NHWC memory format.
        compile: ``torch.compile(dynamic=False)``: one static graph per input shape.
        nonfinite: NaN/Inf loss handling (``policy``: raise | skip, ``check_every_n_steps``).
        preprocess: The input of training (``mean``, ``std``, last stage ``size``), recorded
            so that inference and exports reproduce it from the checkpoint alone.
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
        preprocess: Mapping[str, Any] | None = None,
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
            # Initial weights (backbone.pretrained / backbone.weights) are the app's business
            # when it builds a new run (init_encoder): a checkpoint restores its own tensors.
            pretrained=False,
            head_dropout=head_dropout,
            drop_path_rate=float(backbone.get("drop_path_rate") or 0.0),
            # Any other backbone key is a timm argument, as in pretraining.
            **{k: v for k, v in backbone.items() if k not in handled},
        )
        self.encoder_tensors_loaded = 0
        if backbone.get("pretrained") and backbone.get("weights"):
            raise ValueError("choose backbone.pretrained=true OR backbone.weights=PATH, not both")
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
        self._unlabeled_named: set[str] = set()  # splits whose unlabeled tasks were named
        self.train_task_loss = nn.ModuleDict({t.name: step_mean() for t in self.tasks})
        self.train_weight = nn.ModuleDict({t.name: step_mean() for t in self.tasks})
        self.train_total = step_mean()
        self.val_metrics = nn.ModuleDict(
            {
                str(size): nn.ModuleDict({t.name: task_metrics(t) for t in self.tasks})
                for size in self.eval_sizes
            }
        )

    def init_encoder(self, state: Mapping[str, Tensor], source: str) -> None:
        """Starts the encoder from a plain timm state dict (the app, for a new run only)."""
        self.encoder_tensors_loaded, _ = self.net.load_encoder_state(state, source)

    # -- model ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Plain containers only (OmegaConf arguments too): checkpoints load weights-only.
        plain_hyper_parameters(checkpoint)

    def configure_model(self) -> None:
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if self.compile_model:
            # One graph per (size, batch, train/eval): allow them all, never go dynamic.
            raise_recompile_limit(len(self.eval_sizes) + 2)
            self.net.compile(dynamic=False)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.net(to_channels_last(images, self.channels_last))

    def per_sample_losses(
        self, outputs: Mapping[str, Tensor], batch: Mapping[str, Any]
    ) -> dict[str, Tensor]:
        """Per task, the loss of every sample of the batch, labeled or not: (N,)."""
        return {
            t.name: self.losses[t.name].per_sample(outputs[t.name], batch["target"][t.name])
            for t in self.tasks
        }

    def task_losses(
        self, outputs: Mapping[str, Tensor], batch: Mapping[str, Any]
    ) -> dict[str, Tensor]:
        """Per task, the mean loss over the batch's labeled samples (one process)."""
        per_sample = self.per_sample_losses(outputs, batch)
        return {
            t.name: masked_mean(per_sample[t.name], batch["present"][t.name]) for t in self.tasks
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

    def _empty_images(self) -> Tensor:
        """A batch of no image at the current training size (for a batch that was all bad)."""
        size = self.trainer.datamodule.schedule.stage_at(self.current_epoch).size
        return torch.zeros(0, 3, size, size, device=self.device)

    def _normaliser_counts(
        self, counts: Mapping[str, Tensor], batch_idx: int, accumulate: int
    ) -> Mapping[str, Tensor] | Tensor:
        """This rank's share of each task's normaliser: its labeled samples of the batch, or
        (gradient accumulation) of the whole window, counted from the manifest."""
        if accumulate == 1:
            return counts
        if isinstance(self.weighting, FAMO):
            raise ValueError(
                "weighting=famo needs trainer.accumulate_grad_batches=1: FAMO's weights depend "
                "on the loss of the whole batch, which a micro-batch does not know"
            )
        datamodule = getattr(self.trainer, "datamodule", None)
        if not hasattr(datamodule, "train_label_counts"):
            raise TypeError(
                "trainer.accumulate_grad_batches > 1 needs the MultiTaskDataModule (it counts "
                "each window's labels from the manifest)"
            )
        names = [t.name for t in self.tasks]
        return datamodule.train_label_counts(batch_idx, accumulate, names).to(self.device)

    def training_loss(self, batch: Mapping[str, Any], batch_idx: int) -> TrainingLoss | None:
        """The step's weighted loss from task losses reduced over every rank; None to skip.

        The same collectives on every rank whatever its batch held: one ``all_reduce`` of the
        per-task sums and counts, which also carries the non-finite guard's per-rank flags
        (so every rank raises, or skips, at the same step, with no further collective).
        """
        if "image" in batch:
            outputs = self(batch["image"])
            sums, counts = labeled_sums(self.per_sample_losses(outputs, batch), batch["present"])
        else:
            # Every sample was skipped as bad. The rank still runs the network (on no image:
            # SyncBatchNorm's collectives take an empty input, in the other ranks' statistics
            # dtype) and every reduction below, so the other ranks' steps go on; it
            # contributes no sample.
            with empty_batch_statistics(self.net):
                outputs = self(self._empty_images())
            sums = {t.name: outputs[t.name].float().sum() for t in self.tasks}
            counts = {t.name: torch.zeros((), device=self.device) for t in self.tasks}
        accumulate = max(1, int(self.trainer.accumulate_grad_batches)) if self._trainer else 1
        reduced = global_task_losses(
            sums,
            self._normaliser_counts(counts, batch_idx, accumulate),
            accumulate,
            flags=rank_flags(sums),
        )
        if guard_step(self, reduced.losses, flags=reduced.flags):
            return None
        total, weights = self.weighting(reduced.losses, reduced.present)
        return TrainingLoss(total, weights, sums, counts, outputs[self.tasks[0].name].shape[0])

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        step = self.training_loss(batch, batch_idx)
        if step is None:
            return skip_step(self)
        for t in self.tasks:
            count = step.counts[t.name].float()
            self.train_task_loss[t.name].update(
                step.sums[t.name].detach() / count.clamp(min=1.0), weight=count
            )
            self.train_weight[t.name].update(step.weights[t.name])
        self.train_total.update(step.total.detach())
        self.log(
            "train/loss_step",
            step.total.detach(),
            prog_bar=True,
            logger=False,
            batch_size=step.batch_size,
        )
        return step.total

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure=None):
        optimizer_step_unless_skipped(self, optimizer, optimizer_closure)

    def on_train_epoch_end(self) -> None:
        means = {}
        for t in self.tasks:
            means[t.name] = self.train_task_loss[t.name].compute()
            self.log(f"train/{t.name}/loss", means[t.name])
            self.log(f"weights/{t.name}", self.train_weight[t.name].compute())
            self.train_task_loss[t.name].reset()
            self.train_weight[t.name].reset()
        # A task without a training label this epoch (NaN mean) is left out of the sum.
        labeled = [v for v in means.values() if torch.isfinite(v)]
        if labeled:
            self.log("train/global/loss", torch.stack(labeled).sum())
        self.log("train/total_loss", self.train_total.compute())
        self.train_total.reset()
        self.weighting.epoch_end({name: float(value) for name, value in means.items()})

    # -- validation / test ------------------------------------------------------------------
    def _eval_step(self, batch: Mapping[str, Any], dataloader_idx: int) -> dict[str, Any] | None:
        """Updates the metrics of one evaluation batch; returns its per-image task losses
        (``index``, ``losses``, ``present``) for :class:`~ssl_mt.callbacks.curve_records.
        CurveRecords` (Lightning hands them to the callbacks and keeps nothing)."""
        # No collective here: a rank may skip a batch (all bad) or have one batch fewer.
        if "image" not in batch:
            return None
        outputs = self(batch["image"])
        losses = self.per_sample_losses(outputs, batch)
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
        if "index" not in batch:  # batches built by hand, without dataset indices
            return None
        return {
            "index": batch["index"],
            "losses": {name: value.detach() for name, value in losses.items()},
            "present": batch["present"],
        }

    def validation_step(
        self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, Any] | None:
        return self._eval_step(batch, dataloader_idx)

    def test_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def predict_step(
        self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, Tensor]:
        """Per-task logits (float32) of ``batch["image"]`` (see :mod:`ssl_mt.predict`)."""
        return {name: out.float() for name, out in self(batch["image"]).items()}

    def _log_eval(self, prefix: str) -> None:
        """Logs every size's metrics; the same collectives on every rank, in the same order.

        One ``all_reduce`` of the labeled counts decides, identically on every rank, which
        tasks have a labeled sample anywhere; each of their metrics is then computed (a
        synchronising collective) by every rank, also by one that saw none of its samples.
        A task labeled nowhere is not logged and is left out of ``global/loss``.
        """
        sizes = list(self.val_metrics)
        counts = labeled_counts([self.val_metrics[size] for size in sizes])
        for i, size in enumerate(sizes):
            per_task = self.val_metrics[size]
            present = {t.name: bool(counts[i, j] > 0) for j, t in enumerate(self.tasks)}
            values = log_task_metrics(per_task, present)
            for key, value in values.items():
                self.log(f"{prefix}/{size}/{key}", value, add_dataloader_idx=False)
            task_losses = [values[f"{name}/loss"] for name, on in present.items() if on]
            if not task_losses:
                raise ValueError(
                    f"the {prefix} split has no labeled sample of any task "
                    f"({[t.name for t in self.tasks]}): nothing to evaluate"
                )
            self.log(
                f"{prefix}/{size}/global/loss",
                torch.stack(task_losses).sum(),
                add_dataloader_idx=False,
            )
            self._name_unlabeled(prefix, [name for name, on in present.items() if not on])

    def _name_unlabeled(self, prefix: str, names: list[str]) -> None:
        """Says once per split (not every epoch) which tasks it has no label of."""
        if not names or prefix in self._unlabeled_named:
            return
        self._unlabeled_named.add(prefix)
        if self.global_rank == 0:
            log.warning(
                "the %s split has no labeled sample of task(s) %s on any device: they are not "
                "evaluated and are left out of %s/<size>/global/loss",
                prefix,
                names,
                prefix,
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
