"""Label efficiency: each task's metric and loss against the label fraction, arm by arm."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ssl_mt.compare.figures import RUN_MARKERS, TASK_COLOURS, blank_figure
from ssl_mt.compare.keys import LOSS, METRIC_LABELS
from ssl_mt.compare.statistics import BETTER, NO_DIFFERENCE, is_score, verdict_direction


def plot_study(table: pd.DataFrame, confidence: float) -> Figure:
    """Label efficiency: each task's main metric and loss (largest eval size) against the label
    fraction, one line per arm with its interval (seeds and images); a star above a fraction
    where an arm differs detectably from the reference (filled: better, open: worse)."""
    size = max(table["size"])
    at_size = table[table["size"] == size]
    tasks = list(dict.fromkeys(at_size["task"]))
    reference = table.attrs.get("reference", at_size["reference"].iloc[0])
    arms = [reference, *[a for a in dict.fromkeys(at_size["arm"]) if a != reference]]
    figure = blank_figure((10.5, 2.9 * len(tasks) + 0.8))
    grid = figure.subplots(len(tasks), 2, squeeze=False, sharex=True)
    colours = {arm: TASK_COLOURS[i % len(TASK_COLOURS)] for i, arm in enumerate(arms)}
    fractions = sorted(at_size["fraction"].unique())
    for row, task in enumerate(tasks):
        part = at_size[at_size["task"] == task]
        main = part["metric"].iloc[0]
        metrics = [main, LOSS] if main != LOSS else [LOSS]
        if len(metrics) == 1:  # the global loss: one panel
            grid[row][1].set_visible(False)
            if row > 0:  # the panel above the empty one shows the fractions
                grid[row - 1][1].xaxis.set_tick_params(labelbottom=True)
                grid[row - 1][1].set_xlabel("label fraction")
        for column, metric in enumerate(metrics):
            axes = grid[row][column]
            rows = part[part["metric"] == metric]
            offsets = np.linspace(-0.03, 0.03, len(arms)) if len(arms) > 1 else [0.0]
            # verdict stars sit above every interval at their fraction, clear of all bars
            tops = rows.groupby("fraction")[["high", "reference high"]].max().max(axis=1)
            lift = 0.04 * (tops.max() - rows[["low", "reference low"]].min().min())
            for arm, offset in zip(arms, offsets, strict=True):
                if arm == reference:
                    own = rows.drop_duplicates("fraction")
                    value, low, high = (own[f"reference {k}"] for k in ("value", "low", "high"))
                else:
                    own = rows[rows["arm"] == arm]
                    value, low, high = own["value"], own["low"], own["high"]
                if own.empty:
                    continue
                x = own["fraction"].to_numpy() * (1 + offset)
                axes.errorbar(
                    x,
                    value.to_numpy(),
                    yerr=[value.to_numpy() - low.to_numpy(), high.to_numpy() - value.to_numpy()],
                    color=colours[arm],
                    marker=RUN_MARKERS[arms.index(arm) % len(RUN_MARKERS)],
                    markersize=5,
                    capsize=3,
                    linewidth=1.6,
                    label=arm,
                )
                if arm != reference:
                    for r in own.itertuples():
                        if verdict_direction(r.verdict) == NO_DIFFERENCE:
                            continue
                        axes.plot(
                            [r.fraction * (1 + offset)],
                            [tops[r.fraction] + lift],
                            marker="*",
                            markersize=11,
                            linestyle="none",
                            markeredgecolor=colours[arm],
                            markerfacecolor=colours[arm]
                            if verdict_direction(r.verdict) == BETTER
                            else "white",
                            transform=axes.transData,
                        )
            axes.set_xscale("log")
            axes.set_xticks(fractions, [f"{f:g}%" for f in fractions])
            axes.minorticks_off()
            axes.grid(True, alpha=0.3)
            axes.set_title(f"{task}: {METRIC_LABELS.get(metric, metric)} @ {size} px", fontsize=10)
            axes.set_ylabel(
                METRIC_LABELS.get(metric, metric) + (" ↑" if is_score(metric) else " ↓")
            )
            if row == len(tasks) - 1 or len(metrics) == 1:
                axes.set_xlabel("label fraction")
    handles = [
        Line2D([], [], color=colours[a], marker=RUN_MARKERS[i % len(RUN_MARKERS)])
        for i, a in enumerate(arms)
    ]
    labels = list(arms)
    handles += [
        Line2D([], [], marker="*", linestyle="none", markersize=11, color="0.3"),
        Line2D(
            [],
            [],
            marker="*",
            linestyle="none",
            markersize=11,
            color="0.3",
            markerfacecolor="white",
        ),
    ]
    labels += [
        f"better than {reference} (main metrics, global loss: Holm-adjusted; task losses: unadjusted)",
        f"worse than {reference}",
    ]
    figure.legend(
        handles, labels, loc="outside lower center", ncols=min(len(labels), 4), fontsize=9
    )
    figure.suptitle(
        f"Label efficiency: mean over seeds, {confidence:.0%} intervals over seeds and images",
        x=0.02,
        ha="left",
    )
    return figure
