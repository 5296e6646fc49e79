"""The differences between arms with their intervals, coloured by verdict."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ssl_mt.compare.figures import blank_figure
from ssl_mt.compare.keys import METRIC_LABELS
from ssl_mt.compare.multiplicity import UNADJUSTED
from ssl_mt.compare.statistics import BETTER, NO_DIFFERENCE, WORSE, is_score, verdict_direction

VERDICT_COLOURS = {BETTER: "#1a9641", WORSE: "#d7191c", NO_DIFFERENCE: "0.45"}


def plot_differences(comparisons: pd.DataFrame) -> Figure:
    """Every difference (arm − reference) with its interval: one panel per eval size and
    kind (scores, losses); green = better, red = worse, grey = no detectable difference;
    filled markers for the rows of the adjusted family, open ones for the unadjusted rows."""
    sizes = sorted(comparisons["size"].unique())
    kinds = [("scores (higher is better)", True), ("losses (lower is better)", False)]
    rows_per_kind = {
        kind: comparisons[comparisons["metric"].map(is_score) == score] for kind, score in kinds
    }
    height = max(len(p) for p in rows_per_kind.values()) / max(len(sizes), 1)
    figure = blank_figure((5.4 * len(sizes) + 1.5, 2.2 + 0.32 * height * 2 + 1.2))
    grid = figure.subplots(
        2,
        len(sizes),
        squeeze=False,
        height_ratios=[max(1, len(rows_per_kind[k]) // len(sizes)) for k, _ in kinds],
    )
    for column, size in enumerate(sizes):
        for row, (kind, _) in enumerate(kinds):
            axes = grid[row][column]
            part = rows_per_kind[kind]
            part = part[part["size"] == size]
            labels = [
                f"{r.task} {METRIC_LABELS.get(r.metric, r.metric)}"
                + (f" ({r.arm})" if comparisons["arm"].nunique() > 1 else "")
                for r in part.itertuples()
            ]
            y = np.arange(len(part))[::-1]
            for yi, r in zip(y, part.to_dict("records"), strict=True):
                colour = VERDICT_COLOURS[verdict_direction(r["verdict"])]
                span = [r["difference low"], r["difference high"]]
                in_family = r.get("adjustment", UNADJUSTED) != UNADJUSTED
                axes.plot(span, [yi, yi], color=colour, linewidth=2.2 if in_family else 1.4)
                axes.plot(
                    [r["difference"]],
                    [yi],
                    "o",
                    color=colour,
                    markersize=6 if in_family else 5,
                    markerfacecolor=colour if in_family else "white",
                )
            axes.axvline(0.0, color="0.2", linewidth=0.9)
            axes.set_yticks(y, labels, fontsize=8)
            axes.set_ylim(-0.7, len(part) - 0.3)
            axes.grid(True, axis="x", alpha=0.3)
            axes.set_title(f"val @ {size} px: {kind}", fontsize=10)
            axes.set_xlabel("difference (arm − reference) with its interval")
    reference = comparisons["reference"].iloc[0]
    arms = ", ".join(comparisons["arm"].unique())
    figure.suptitle(f"Differences {arms} − {reference}", x=0.02, ha="left")
    handles = [Line2D([], [], color=c, linewidth=2.2, marker="o") for c in VERDICT_COLOURS.values()]
    handles += [
        Line2D([], [], color="0.3", linewidth=2.2, marker="o"),
        Line2D([], [], color="0.3", linewidth=1.4, marker="o", markerfacecolor="white"),
    ]
    labels = [*VERDICT_COLOURS, "in the adjusted family", "unadjusted (secondary)"]
    figure.legend(handles, labels, loc="outside lower center", ncols=5, fontsize=9)
    return figure
