"""What every self-supervised method shares: backbone, optimiser and lr rule, monitors.

A method subclasses :class:`SSLModule` and implements :meth:`SSLModule.ssl_step`; the base
class logs the loss and the collapse indicator, runs the kNN monitor on the labeled
validation loaders, and owns the optimiser and schedule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn

from ssl_mt.lr_plan import lambda_scheduler, plan_lr, trainer_world
from ssl_mt.models.backbone import create_backbone, match_state_dict
from ssl_mt.models.collectives import gather_rows
from ssl_mt.models.compilation import raise_recompile_limit
from ssl_mt.models.knn import embedding_std, knn_predict
from ssl_mt.models.nonfinite import NonFiniteGuard, guard_step
from ssl_mt.models.skipping import optimizer_step_unless_skipped, skip_step
from ssl_mt.models.task_metrics import step_mean
from ssl_mt.optim import build_optimizer, decay_groups
from ssl_mt.safe_loading import plain_hyper_parameters


def to_channels_last(x: Tensor, enabled: bool) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last) if enabled and x.ndim == 4 else x


class SSLModule(L.LightningModule):
    """Base LightningModule of the pretraining methods.

    Args:
        backbone: The ``backbone`` config (``name``, ``pretrained``, ``weights``,
            ``grad_checkpointing`` and extra timm kwargs).
        optim: The ``optim`` config (``name``, ``base_lr``, ``lr_scaling``,
            ``reference_batch``, ``weight_decay``, ``warmup_epochs``, ``min_lr_ratio``, ...).
        knn: kNN monitor settings (``k``, ``temperature``).
        channels_last: Run convolutions in NHWC memory format (faster with bf16 on GPUs).
        compile: ``torch.compile`` the backbone with static shapes (``dynamic=False``).
        image_size: Training resolution, recorded in the export.
        nonfinite: NaN/Inf loss handling (``policy``: raise | skip, ``check_every_n_steps``).
    """

    def __init__(
        self,
        backbone: Mapping[str, Any],
        optim: Mapping[str, Any],
        knn: Mapping[str, Any] | None = None,
        channels_last: bool = True,
        compile: bool = False,
        image_size: int | None = None,
        nonfinite: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.backbone_cfg = dict(backbone)
        self.optim_cfg = dict(optim)
        self.knn_cfg = dict(knn or {"k": 20, "temperature": 0.07})
        self.channels_last = channels_last
        self.compile_backbone = compile
        self.image_size = image_size
        # Initial weights (backbone.pretrained / backbone.weights) are loaded by the app when
        # it builds a new run (init_backbone), never here: checkpoints restore their own.
        self.backbone = create_backbone(
            **{**self.backbone_cfg, "pretrained": False, "weights": None}
        )
        self.nonfinite = NonFiniteGuard(**dict(nonfinite or {}))
        self.train_loss = step_mean()
        self.train_std = step_mean()
        self._knn_features: list[list[Tensor]] = [[], []]
        self._knn_labels: list[list[Tensor]] = [[], []]

    def init_backbone(self, state: Mapping[str, Tensor], source: str) -> None:
        """Starts the backbone from a plain timm state dict (the app, for a new run only)."""
        subset = match_state_dict(self.backbone, state, source)
        self.backbone.load_state_dict(subset, strict=True)

    # -- to implement -------------------------------------------------------------------
    def ssl_step(self, views: Sequence[Tensor]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Computes the method's loss on one batch of views.

        Returns:
            ``(loss, embeddings, extra)``: embeddings (N, D) feed the collapse indicator;
            ``extra`` holds further per-step scalars (logged as epoch means).
        """
        raise NotImplementedError

    def head_modules(self) -> list[nn.Module]:
        """Trainable modules besides the backbone (projectors, predictors)."""
        return []

    # -- shared -------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Plain containers only (OmegaConf arguments too): checkpoints load weights-only.
        plain_hyper_parameters(checkpoint)

    def configure_model(self) -> None:
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        if self.compile_backbone:
            # Static shapes: one graph per (size, batch, train/eval), no dynamic shapes; room
            # for them all (multi-crop views are two shapes per stage, the kNN monitor three).
            raise_recompile_limit(self._stage_count() + 2)
            self.backbone.compile(dynamic=False)

    def _stage_count(self) -> int:
        """Stages of the attached trainer's schedule (1 without a trainer, as in the bench)."""
        datamodule = getattr(self._trainer, "datamodule", None)
        schedule = getattr(datamodule, "schedule", None)
        return len(schedule.stages) if schedule is not None else 1

    def features(self, images: Tensor) -> Tensor:
        """Pooled backbone features (N, C)."""
        return self.backbone(to_channels_last(images, self.channels_last))

    def _skip_short_batch(self, batch: Mapping[str, Any]) -> bool:
        """True (on every rank alike) when the step must be skipped for bad samples.

        The methods gather equal-sized batches from every rank (NT-Xent's negatives, MoCo's
        keys), so under DDP a batch that lost a sample as bad on any rank skips the step on
        all of them; the agreement costs one small ``all_reduce`` per step, only with
        ``data.on_bad_sample=skip``. In one process only an empty batch is skipped.
        """
        empty = "views" not in batch
        datamodule = getattr(self.trainer, "datamodule", None)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not distributed or getattr(datamodule, "on_bad_sample", "raise") != "skip":
            return empty
        short = torch.tensor(float(empty or bool(batch.get("bad_samples"))), device=self.device)
        dist.all_reduce(short, op=dist.ReduceOp.MAX)
        return bool(short)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        if self._skip_short_batch(batch):
            return skip_step(self)
        views = batch["views"]
        loss, embeddings, extra = self.ssl_step(views)
        # guard_step agrees over the ranks (an all_reduce of the per-rank flags): every rank
        # skips, or raises, at the same step.
        if guard_step(self, {"loss": loss}):
            return skip_step(self)
        batch_size = views[0].shape[0]
        self.train_loss.update(loss.detach())
        with torch.no_grad():
            self.train_std.update(embedding_std(embeddings.detach()))
        self.log(
            "train/loss_step", loss.detach(), prog_bar=True, logger=False, batch_size=batch_size
        )
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, batch_size=batch_size)
        self.log("train/embedding_std", self.train_std, on_step=False, on_epoch=True)
        for name, metric in self.extra_metrics.items():
            metric.update(extra[name].detach())
            self.log(f"train/{name}", metric, on_step=False, on_epoch=True)
        return loss

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure=None):
        optimizer_step_unless_skipped(self, optimizer, optimizer_closure)

    @property
    def extra_metrics(self) -> nn.ModuleDict:
        """Epoch-mean metrics of the ``extra`` scalars; subclasses create them in __init__."""
        return getattr(self, "_extra_metrics", nn.ModuleDict())

    # -- kNN monitor (validation) -------------------------------------------------------
    def validation_step(
        self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Loader 0 is the labeled memory bank, loader 1 the queries."""
        if not batch.get("image", torch.empty(0)).numel():
            return
        features = self.features(batch["image"]).float()
        labels = torch.stack([batch["target"][t.name] for t in self.knn_tasks], dim=1)
        self._knn_features[dataloader_idx].append(features)
        self._knn_labels[dataloader_idx].append(labels)

    @property
    def knn_tasks(self) -> list:
        datamodule = getattr(self.trainer, "datamodule", None)
        return list(getattr(datamodule, "knn_tasks", []))

    def on_validation_epoch_end(self) -> None:
        for name, value in self._knn_scores("top1").items():
            self.log(name, value, rank_zero_only=True)

    def on_train_start(self) -> None:
        """Scores the backbone as it is before the first step: ``knn/<task>/random``.

        The reference the epoch curves (``knn/<task>/top1``) must beat to show that the
        pretraining learned anything; logged once, at step 0 (a resumed run has it).
        """
        datamodule = self.trainer.datamodule
        if self.global_step > 0 or not getattr(datamodule, "has_knn", False):
            return
        training = self.training
        self.eval()
        try:
            with torch.no_grad():
                for index, loader in enumerate(datamodule.val_dataloader()):
                    for batch_idx, batch in enumerate(loader):
                        batch = move_data_to_device(batch, self.device)
                        self.validation_step(batch, batch_idx, index)
        finally:
            self.train(training)
        # The majority rate is logged with every epoch's scores: only the random ones here.
        scores = {k: v for k, v in self._knn_scores("random").items() if k.endswith("/random")}
        if self.trainer.is_global_zero and scores:
            for logger in self.loggers:
                logger.log_metrics({**scores, "epoch": 0}, step=0)

    def _knn_scores(self, name: str) -> dict[str, float]:
        """kNN top-1 (as ``knn/<task>/<name>``) and the majority-class rate of every kNN task.

        ``knn/<task>/majority`` is the query accuracy of always answering the bank's most
        frequent class: what a backbone that learned nothing scores on imbalanced classes.
        Empties the feature buffers of the pass.

        Under DDP every rank makes the same collectives whatever its shards held (none, or
        fewer rows than another rank's, as under ``data.on_bad_sample=skip``): padded gathers
        (:func:`~ssl_mt.models.collectives.gather_rows`), never a return before them. The scores are
        then the same on every rank.
        """
        scores: dict[str, float] = {}
        try:
            if not self.knn_tasks:  # the config's, the same on every rank
                return scores
            bank = gather_rows(self._knn_part(self._knn_features[0], torch.float32))
            query = gather_rows(self._knn_part(self._knn_features[1], torch.float32))
            bank_labels = gather_rows(self._knn_part(self._knn_labels[0], torch.long))
            query_labels = gather_rows(self._knn_part(self._knn_labels[1], torch.long))
            for column, task in enumerate(self.knn_tasks):
                in_bank = bank_labels[:, column] >= 0
                in_query = query_labels[:, column] >= 0
                if not in_bank.any() or not in_query.any():
                    continue
                known = bank_labels[in_bank, column]
                truth = query_labels[in_query, column]
                predicted = knn_predict(
                    bank[in_bank],
                    known,
                    query[in_query],
                    task.num_classes,
                    k=int(self.knn_cfg.get("k", 20)),
                    temperature=float(self.knn_cfg.get("temperature", 0.07)),
                )
                majority = torch.bincount(known, minlength=task.num_classes).argmax()
                scores[f"knn/{task.name}/{name}"] = float((predicted == truth).float().mean())
                scores[f"knn/{task.name}/majority"] = float((truth == majority).float().mean())
            return scores
        finally:
            # Nothing survives the pass: the monitor's memory is bounded by one pass.
            self._knn_features = [[], []]
            self._knn_labels = [[], []]

    def _knn_part(self, parts: list[Tensor], dtype: torch.dtype) -> Tensor:
        """This rank's rows of one kNN buffer: (N, D) features or (N, T) labels; (0, ·) when
        the rank had no batch (the feature width is then unknown here: 0)."""
        if parts:
            return torch.cat(parts)
        width = len(self.knn_tasks) if dtype == torch.long else 0
        return torch.zeros(0, width, dtype=dtype, device=self.device)

    # -- optimisation -------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        datamodule = self.trainer.datamodule
        world, accumulate = trainer_world(self.trainer)
        lr, multiplier = plan_lr(
            self.optim_cfg, datamodule.schedule, datamodule.num_train_samples, world, accumulate
        )
        groups = decay_groups(self.backbone, self.optim_cfg["weight_decay"], tag="backbone")
        groups += decay_groups(self.head_modules(), self.optim_cfg["weight_decay"], tag="head")
        optimizer = build_optimizer(groups, self.optim_cfg, lr)
        scheduler = lambda_scheduler(optimizer, multiplier)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
