"""Compare fine-tuning runs and arms of runs: did the pretraining help, and how sure is that?

Modules:

- :mod:`~ssl_mt.compare.run`: reading one run folder (``metrics.csv``, ``.hydra/config.yaml``,
  resolution switches), :mod:`~ssl_mt.compare.keys` the metric keys and their order;
- :mod:`~ssl_mt.compare.arms`: arms (groups of seeds) and Hydra multirun folders;
- :mod:`~ssl_mt.compare.records`: per-image evaluation records and the tasks they hold;
- :mod:`~ssl_mt.compare.study_layout`: the ``<arm>/frac<PCT>/seed<S>/`` study folders;
- :mod:`~ssl_mt.compare.ingredients`: metrics as ratios of per-image sums (the records'
  columns), :mod:`~ssl_mt.compare.statistics` the paired bootstrap over images with the
  variance between seeds, intervals and verdicts;
- :mod:`~ssl_mt.compare.tables`: final/best metrics, jumps at the resolution switch, markdown;
- :mod:`~ssl_mt.compare.differences`: differences between arms with intervals and verdicts,
  the label-efficiency table;
- :mod:`~ssl_mt.compare.curves`: loss curves with bands over seeds and resolution switches,
  :mod:`~ssl_mt.compare.differences_plot` the differences with their intervals,
  :mod:`~ssl_mt.compare.study_plot` the label-efficiency curves, and
  :mod:`~ssl_mt.compare.figures` what they share (palette, markers, ``save_figure``);
- :mod:`~ssl_mt.compare.report`: ``report.md`` / ``study.md`` with their figures;
- ``python -m ssl_mt.compare`` (:mod:`~ssl_mt.compare.__main__`): the command line.

The notebook ``notebooks/compare_loss_curves.ipynb`` calls the functions exported here.
"""

from ssl_mt.compare.arms import Arm, load_arms
from ssl_mt.compare.claims import claims_table, study_claims
from ssl_mt.compare.claims_report import claims_markdown, claims_summary
from ssl_mt.compare.curves import plot_train_losses, plot_val_losses
from ssl_mt.compare.differences import (
    comparison_table,
    study_table,
    verdict_table,
)
from ssl_mt.compare.differences_plot import plot_differences
from ssl_mt.compare.figures import save_figure
from ssl_mt.compare.report import (
    load_choice,
    markdown_report,
    seed_line,
    study_markdown,
    verdict_text,
    write_comparison,
    write_report,
    write_study,
)
from ssl_mt.compare.run import CompareError, Run, Switch, load_run, load_runs, unique_names
from ssl_mt.compare.selection import RecordsChoice, resolve_choice
from ssl_mt.compare.statistics import BootstrapSettings, compare_arms, verdict
from ssl_mt.compare.study_layout import StudyCell, load_study
from ssl_mt.compare.study_plot import plot_study
from ssl_mt.compare.tables import jump_table, summary_table

__all__ = [
    "Arm",
    "BootstrapSettings",
    "CompareError",
    "RecordsChoice",
    "Run",
    "StudyCell",
    "Switch",
    "claims_markdown",
    "claims_summary",
    "claims_table",
    "compare_arms",
    "comparison_table",
    "jump_table",
    "load_arms",
    "load_choice",
    "load_run",
    "load_runs",
    "load_study",
    "markdown_report",
    "plot_differences",
    "plot_study",
    "plot_train_losses",
    "plot_val_losses",
    "resolve_choice",
    "save_figure",
    "seed_line",
    "study_claims",
    "study_markdown",
    "study_table",
    "summary_table",
    "unique_names",
    "verdict",
    "verdict_table",
    "verdict_text",
    "write_comparison",
    "write_report",
    "write_study",
]
