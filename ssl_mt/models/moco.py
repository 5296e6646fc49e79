"""MoCo v2: a momentum key encoder, a queue of negatives from every rank, InfoNCE.

- [0] MoCo, 2020, https://arxiv.org/abs/1911.05722 (queue, momentum encoder, shuffling BN)
- [1] MoCo v2, 2020, https://arxiv.org/abs/2003.04297 (MLP head, temperature 0.2)

The query encoder (backbone + MLP head) is trained; the key encoder is its EMA
(:mod:`ssl_mt.models.ema`, constant momentum 0.999). Each step's keys of ALL ranks are
enqueued (a no-gradient ``all_gather``), so every rank holds the same queue.

Shuffling BN and SyncBatchNorm exclude each other. Shuffling BN keeps a query and its key
from sharing batch statistics by giving the key encoder's per-GPU BatchNorm another subset of
the global batch; SyncBatchNorm (``trainer.sync_batchnorm``) computes both encoders'
statistics over the whole global batch, which a permutation does not change, so the
statistics are shared again and the shuffle only costs two all-gathers. The combination is
refused when training starts: per-GPU BatchNorm with shuffled keys (the paper's setup,
``trainer.sync_batchnorm=false``) or global statistics without the shuffle
(``method.shuffle_bn=false``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_mt.losses.info_nce import KeyQueue, batch_shuffle, batch_unshuffle, info_nce_logits
from ssl_mt.models.ema import MomentumSSLModule, momentum_copy
from ssl_mt.models.ssl_base import to_channels_last
from ssl_mt.models.task_metrics import step_mean


def moco_v2_head(in_dim: int, hidden_dim: int | None = None, out_dim: int = 128) -> nn.Module:
    """MoCo v2's MLP head: Linear → ReLU → Linear (no BatchNorm)."""
    hidden = hidden_dim or in_dim
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)
    )


class MoCoModule(MomentumSSLModule):
    """MoCo v2 pretraining of a timm backbone.

    Args:
        projection: ``hidden_dim`` (None: the backbone's feature size) and ``out_dim`` (128).
        queue_size: K negatives (65536); a multiple of every stage's global batch.
        temperature: InfoNCE temperature (0.2).
        shuffle_bn: Shuffle the key batch across ranks (DDP only; not with SyncBatchNorm).
        momentum: Key-encoder EMA (:class:`ssl_mt.models.ema.MomentumSchedule`; constant 0.999).
        batch_size: Per-device batch, when known at construction: ``queue_size`` is checked
            against it at once (the full check, with the world size, runs in :meth:`setup`).
        **kwargs: See :class:`ssl_mt.models.ssl_base.SSLModule`.
    """

    def __init__(
        self,
        projection: Mapping[str, Any] | None = None,
        queue_size: int = 65536,
        temperature: float = 0.2,
        shuffle_bn: bool = True,
        momentum: Mapping[str, Any] | None = None,
        batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(momentum=momentum or {"base": 0.999, "schedule": "constant"}, **kwargs)
        self.save_hyperparameters()
        if temperature <= 0:
            raise ValueError(f"method.temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.shuffle_bn = shuffle_bn
        projection = dict(projection or {})
        self.projector = moco_v2_head(self.backbone.num_features, **projection)
        self.target = nn.ModuleDict(
            {"backbone": momentum_copy(self.backbone), "projector": momentum_copy(self.projector)}
        )
        self.queue = KeyQueue(queue_size, projection.get("out_dim", 128))
        if batch_size is not None:
            self.check_queue(batch_size, 1, "the per-device batch")
        self._extra_metrics = nn.ModuleDict({"contrastive_top1": step_mean()})

    def check_queue(self, batch_size: int, world_size: int, what: str) -> None:
        """Raises unless ``queue_size`` is a multiple of ``batch_size × world_size``."""
        global_batch = batch_size * world_size
        if self.queue.size % global_batch:
            raise ValueError(
                f"method.queue_size={self.queue.size} must be a multiple of the global batch "
                f"{global_batch} ({what}: batch_size={batch_size} × {world_size} process(es)), "
                "so that every key stays in the queue for the same number of steps"
            )

    def setup(self, stage: str) -> None:
        schedule = getattr(getattr(self.trainer, "datamodule", None), "schedule", None)
        if schedule is None:
            return
        world = max(1, self.trainer.world_size)
        for i, s in enumerate(schedule.stages):
            self.check_queue(s.batch_size, world, f"schedule.stages[{i}]")

    def on_fit_start(self) -> None:
        # The strategy has applied its layer sync (SyncBatchNorm) by now.
        self.check_shuffle_bn()

    def check_shuffle_bn(self) -> None:
        """Raises when Shuffling BN would run on a SyncBatchNorm key encoder (pointless: its
        statistics are those of the global batch, whatever the order)."""
        if self.shuffle_bn and any(isinstance(m, nn.SyncBatchNorm) for m in self.target.modules()):
            raise ValueError(
                "method.shuffle_bn=true with SyncBatchNorm (trainer.sync_batchnorm=true): the "
                "key encoder's BatchNorm statistics are those of the global batch, so shuffling "
                "the keys cannot keep a query and its key from sharing them. Choose "
                "trainer.sync_batchnorm=false (per-GPU BatchNorm with shuffled keys, as in MoCo) "
                "or method.shuffle_bn=false (global BatchNorm statistics, no shuffle)"
            )

    def head_modules(self) -> list[nn.Module]:
        return [self.projector]

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [
            (self.backbone, self.target["backbone"]),
            (self.projector, self.target["projector"]),
        ]

    @torch.no_grad()
    def keys(self, images: Tensor) -> Tensor:
        """Key-encoder embeddings (B, out_dim) of ``images``, batch-shuffled under DDP."""
        images, unshuffle = batch_shuffle(images) if self.shuffle_bn else (images, None)
        target = self.target
        k = target["projector"](target["backbone"](to_channels_last(images, self.channels_last)))
        return batch_unshuffle(k, unshuffle)

    def ssl_step(self, views: Sequence[Tensor]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        if len(views) != 2:
            raise ValueError(f"MoCo takes 2 views per image, got {len(views)}")
        q = self.projector(self.features(views[0]))
        k = self.keys(views[1])
        # A copy: the queue changes in place below, the backward pass needs this version.
        logits = info_nce_logits(q, k, self.queue.keys.clone(), self.temperature)
        targets = logits.new_zeros(logits.shape[0], dtype=torch.long)
        loss = F.cross_entropy(logits, targets)
        with torch.no_grad():
            top1 = (logits.argmax(dim=1) == 0).float().mean()
        self.queue.enqueue(k)
        return loss, q, {"contrastive_top1": top1}
