"""Experiment trackers beside the CSV log: Lightning's MLflow and W&B loggers, tied to the run.

``conf/logger/mlflow.yaml`` and ``conf/logger/wandb.yaml`` select them
(``logger=[csv,mlflow]``, ``logger=[csv,wandb]``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import MLFlowLogger, WandbLogger

RUN_DIR_TAG = "ssl_mt.run_dir"
NOT_LOGGING_URI = "http://non-zero-rank.invalid"  # reserved domain (RFC 2606): never resolves


class RunDirMLFlowLogger(MLFlowLogger):
    """``MLFlowLogger`` whose run is tagged with the run directory, so a resumed run
    (same directory, see ``ckpt_path``) continues the same MLflow run instead of starting
    a second one.

    Args:
        run_dir: The run directory; stored as the tag ``ssl_mt.run_dir``.
        **kwargs: ``MLFlowLogger`` arguments (``experiment_name``, ``tracking_uri``, ...).
    """

    def __init__(self, run_dir: str, **kwargs: Any) -> None:
        # MLflow logs at INFO each time it creates or upgrades an SQLite store's tables.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        self.run_dir = str(Path(run_dir).resolve())
        tags = {**(kwargs.pop("tags", None) or {}), RUN_DIR_TAG: self.run_dir}
        if rank_zero_only.rank != 0:
            # Only rank 0 logs, but MLflowLogger opens its store in every process: processes
            # started together (torchrun, SLURM) would all create the same SQLite file's
            # tables at once. A REST client connects only when used, i.e. never here.
            kwargs["tracking_uri"] = NOT_LOGGING_URI
        super().__init__(tags=tags, **kwargs)

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if not self._initialized and self._run_id is None:
            self._experiment_id = self._experiment_id or self._own_experiment_id()
            self._run_id = self._previous_run_id()
        return super().experiment

    def _own_experiment_id(self) -> str:
        """The experiment's id, created here when new (Lightning would warn that it is new)."""
        found = self._mlflow_client.get_experiment_by_name(self._experiment_name)
        if found is not None and found.lifecycle_stage != "deleted":
            return found.experiment_id
        return self._mlflow_client.create_experiment(
            name=self._experiment_name, artifact_location=self._artifact_location
        )

    def _previous_run_id(self) -> str | None:
        """The run of this experiment tagged with this run directory, if there is one."""
        value = self.run_dir.replace("'", "\\'")
        runs = self._mlflow_client.search_runs(
            experiment_ids=[self._experiment_id],
            filter_string=f"tags.`{RUN_DIR_TAG}` = '{value}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0].info.run_id if runs else None


class QuietWandbLogger(WandbLogger):
    """Lightning's ``WandbLogger`` without the deprecated ``anonymous`` setting.

    Lightning always passes ``anonymous=None`` to ``wandb.init``; recent wandb versions warn
    on every run that the setting has no effect. It is passed only when set.
    """

    def __init__(self, *args: Any, anonymous: bool | None = None, **kwargs: Any) -> None:
        super().__init__(*args, anonymous=anonymous, **kwargs)
        if anonymous is None:
            self._wandb_init.pop("anonymous", None)
