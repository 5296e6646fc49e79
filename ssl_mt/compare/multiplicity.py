"""Verdicts of a declared family, adjusted together for multiplicity.

Every row of a comparison is a 95 % interval of its own, so a table of 18 differences
expects about one false "better" or "worse" when nothing differs. The rows that answer the
question asked (a *family*, declared before the data are seen: each task's main metric and
the global loss at the largest evaluation size; for a study, those × the label fractions)
get p-values adjusted together with statsmodels' ``multipletests`` (Holm by default: it
controls the family-wise error rate at ``1 − confidence`` under any dependence between the
tasks). Their verdict reads the adjusted p-value; every other row keeps its own interval's
verdict and is marked ``unadjusted``.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from statsmodels.stats.multitest import multipletests

from ssl_mt.compare.statistics import direction, worded_verdict

# statsmodels' method names, and how the reports name them.
METHODS = {
    "holm": "Holm",
    "fdr_bh": "Benjamini–Hochberg",
    "bonferroni": "Bonferroni",
}
UNADJUSTED = "unadjusted"


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"multiplicity method {method!r}: use one of {sorted(METHODS)}")
    return method


def adjusted_p_values(p_values: Sequence[float], method: str = "holm") -> np.ndarray:
    """The family's p-values adjusted together (``multipletests``), in the given order."""
    check_method(method)
    p_values = np.asarray(p_values, dtype=float)
    if len(p_values) == 0:
        return p_values
    # multipletests' step-down methods call gc.collect(), a full scan of the heap (40 ms with
    # torch imported); objects frozen out of the collector's generations are not scanned.
    # (A heap someone else froze stays frozen.)
    frozen_before = gc.get_freeze_count()
    gc.freeze()
    try:
        return multipletests(p_values, method=method)[1]
    finally:
        if frozen_before == 0:
            gc.unfreeze()


def family_label(name: str, method: str, members: int) -> str:
    """``Holm over the family 'main metrics @ 96 px' (6 tests)``."""
    return f"{METHODS[check_method(method)]} over the family '{name}' ({members} tests)"


def apply_family(
    table: pd.DataFrame, primary: pd.Series, name: str, method: str, alpha: float
) -> pd.DataFrame:
    """Adjusts the ``primary`` rows of a comparison table together and words every verdict.

    Args:
        table: Rows with ``difference``, ``metric``, ``p`` and ``method`` (True: every arm
            has ≥ 2 seeds) columns, and the unadjusted ``verdict``.
        primary: Boolean mask of the family's rows.
        name: The family's name, as the report states it.
        method: A :data:`METHODS` key.
        alpha: The level (``1 − confidence``).

    Returns:
        The table with ``verdict unadjusted`` (the interval's), ``p adjusted`` (NaN outside
        the family), ``adjustment`` (the family's label, or ``unadjusted``) and ``verdict``
        (the adjusted one in the family, else the interval's).
    """
    table = table.copy()
    primary = primary.reindex(table.index, fill_value=False).astype(bool)
    table["verdict unadjusted"] = table["verdict"]
    table["p adjusted"] = math.nan
    table["adjustment"] = UNADJUSTED
    members = int(primary.sum())
    if members:
        adjusted = adjusted_p_values(table.loc[primary, "p"].to_numpy(), method)
        table.loc[primary, "p adjusted"] = adjusted
        table.loc[primary, "adjustment"] = family_label(name, method, members)
        verdicts = []
        for row, p in zip(table[primary].to_dict("records"), adjusted, strict=True):
            found = direction(row["difference"], row["metric"]) if p < alpha else None
            verdicts.append(worded_verdict(found, bool(row["method"])))
        table.loc[primary, "verdict"] = verdicts
    return table
