"""LightningDataModules for SSL pretraining and multi-task fine-tuning.

- :mod:`~ssl_mt.data.datamodules.multitask`: :class:`MultiTaskDataModule` (fine-tuning).
- :mod:`~ssl_mt.data.datamodules.pretraining`: :class:`SSLDataModule` (SSL pretraining).
- :mod:`~ssl_mt.data.datamodules.staged`: the base both share (one train loader per
  schedule stage, evaluation loaders); loader settings live in :mod:`ssl_mt.data.loaders`.

Configs name them by these flat paths (``_target_: ssl_mt.data.datamodules.SSLDataModule``).
"""

from ssl_mt.data.datamodules.multitask import MultiTaskDataModule
from ssl_mt.data.datamodules.pretraining import SSLDataModule

__all__ = ["MultiTaskDataModule", "SSLDataModule"]
