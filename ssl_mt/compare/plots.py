"""Figures of a comparison: loss curves per task and global with bands over seeds, the
differences between arms with their intervals, and label-efficiency curves."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import Formatter, FuncFormatter

from ssl_mt.compare.arms import Arm, as_arms
from ssl_mt.compare.keys import GLOBAL, LOSS, _all_tasks, _sorted_sizes
from ssl_mt.compare.run import Run
from ssl_mt.compare.statistics import BETTER, NO_DIFFERENCE, WORSE, is_score

RUN_STYLES = ("-", "--", ":", "-.")
RUN_MARKERS = ("o", "s", "^", "D", "v", "P")
TASK_COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#7f7f7f",
)
GLOBAL_COLOUR = "black"
SWITCH_COLOUR = "0.45"
DPI = 110


# -- figures ---------------------------------------------------------------------------------
def _new_figure(panels: int, columns: int = 3, width: float = 5.2) -> tuple[Figure, list[Axes]]:
    columns = max(1, min(columns, panels))
    rows = math.ceil(panels / columns)
    figure = Figure(
        figsize=(width * columns + 2.8, 3.9 * rows + 0.4),
        dpi=DPI,
        layout="constrained",
        facecolor="white",
    )
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False, sharex=True).ravel().tolist()
    for extra in axes[panels:]:
        extra.set_visible(False)
    return figure, axes[:panels]


def _task_colours(tasks: Sequence[str]) -> dict[str, str]:
    colours = {GLOBAL: GLOBAL_COLOUR}
    for i, task in enumerate(t for t in tasks if t != GLOBAL):
        colours[task] = TASK_COLOURS[i % len(TASK_COLOURS)]
    return colours


def _curve_stats(series: Sequence[pd.Series]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Epochs, mean and std over the runs of an arm (epochs every run has; std 0 for one)."""
    frame = pd.concat(list(series), axis=1).dropna()
    epochs = frame.index.to_numpy()
    values = frame.to_numpy()
    std = values.std(axis=1, ddof=1) if values.shape[1] > 1 else np.zeros(len(frame))
    return epochs, values.mean(axis=1), std


def _draw_curve(
    axes: Axes,
    series: Sequence[pd.Series],
    task: str,
    arm_index: int,
    colours: Mapping[str, str],
) -> None:
    """The mean curve of an arm's runs, with a ±1 std band over seeds when it has several."""
    series = [s for s in series if not s.empty]
    if not series:
        return
    epochs, mean, std = _curve_stats(series)
    if len(epochs) == 0:
        return
    bold = task == GLOBAL
    axes.plot(
        epochs,
        mean,
        color=colours[task],
        linestyle=RUN_STYLES[arm_index % len(RUN_STYLES)],
        marker=RUN_MARKERS[arm_index % len(RUN_MARKERS)],
        markevery=max(1, len(epochs) // 25),  # long runs: a marker every few epochs
        markersize=4 if bold else 3,
        linewidth=2.6 if bold else 1.2,
        alpha=1.0 if bold else 0.85,
        zorder=3 if bold else 2,
    )
    if len(series) > 1:
        low, high = mean - std, mean + std
        if axes.get_yscale() == "log":
            low = np.maximum(low, mean * 0.05)  # a log axis cannot show a band below 0
        axes.fill_between(epochs, low, high, color=colours[task], alpha=0.15, linewidth=0, zorder=1)


def _draw_switches(axes: Axes, runs: Sequence[Run], annotate: bool) -> None:
    """A vertical line between the last epoch of a stage and the first of the next."""
    drawn: dict[int, list[str]] = {}
    for run in runs:
        for switch in run.switches:
            drawn.setdefault(switch.epoch, [])
            if switch.label not in drawn[switch.epoch]:
                drawn[switch.epoch].append(switch.label)
    for epoch, labels in sorted(drawn.items()):
        x = epoch - 0.5
        axes.axvline(x, color=SWITCH_COLOUR, linestyle=(0, (4, 2, 1, 2)), linewidth=1.3, zorder=1)
        if annotate:
            axes.annotate(
                " / ".join(labels),
                xy=(x, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(3, -3),
                textcoords="offset points",
                ha="left",
                va="top",
                fontsize=8,
                color=SWITCH_COLOUR,
            )


def _arm_label(arm: Arm) -> str:
    return arm.name if arm.seeds == 1 else f"{arm.name} (mean of {arm.seeds} seeds, band ±1 std)"


def _title(figure: Figure, what: str, arms: Sequence[Arm]) -> None:
    figure.suptitle(f"{what}: {' vs '.join(a.name for a in arms)}", x=0.02, ha="left")


def _legend(figure: Figure, arms: Sequence[Arm], tasks: Sequence[str]) -> None:
    colours = _task_colours(tasks)
    handles = [
        Line2D([], [], color=colours[t], linewidth=2.6 if t == GLOBAL else 1.4) for t in tasks
    ]
    labels = [f"{GLOBAL} (sum of task losses)" if t == GLOBAL else t for t in tasks]
    for i, arm in enumerate(arms):
        handles.append(
            Line2D(
                [],
                [],
                color="0.2",
                linestyle=RUN_STYLES[i % len(RUN_STYLES)],
                marker=RUN_MARKERS[i % len(RUN_MARKERS)],
                markersize=4,
            )
        )
        labels.append(f"run: {_arm_label(arm)}")
    if any(run.switches for arm in arms for run in arm.runs):
        handles.append(Line2D([], [], color=SWITCH_COLOUR, linestyle=(0, (4, 2, 1, 2))))
        labels.append("resolution switch")
    figure.legend(
        handles, labels, loc="outside right upper", fontsize=9, title="colour = task, style = run"
    )


def _task_colours(tasks: Sequence[str]) -> dict[str, str]:
    colours = {GLOBAL: GLOBAL_COLOUR}
    for i, task in enumerate(t for t in tasks if t != GLOBAL):
        colours[task] = TASK_COLOURS[i % len(TASK_COLOURS)]
    return colours


class _MinorLogFormatter(Formatter):
    """Labels the 2, 3, 5 and 7 minor ticks of a log axis spanning less than ~1.5 decades."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        low, high = sorted(self.axis.get_view_interval())
        if x <= 0 or low <= 0 or high / low > 30:
            return ""
        mantissa = round(x / 10 ** math.floor(math.log10(x)), 6)
        return f"{x:g}" if mantissa in (2.0, 3.0, 5.0, 7.0) else ""


def _style_axes(axes: Axes, title: str, logy: bool) -> None:
    axes.set_title(title)
    axes.set_xlabel("epoch")
    axes.set_ylabel("loss" + (" (log scale)" if logy else ""))
    if logy:
        axes.set_yscale("log")
        # Plain numbers on the ticks: losses rarely span more than two decades.
        axes.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        axes.yaxis.set_minor_formatter(_MinorLogFormatter())
    axes.grid(True, alpha=0.3)
    axes.xaxis.get_major_locator().set_params(integer=True)


def _runs(arms: Sequence[Arm]) -> list[Run]:
    return [run for arm in arms for run in arm.runs]


def plot_val_losses(items: Sequence[Run | Arm], logy: bool = True, columns: int = 3) -> Figure:
    """Validation losses: one panel per evaluation resolution.

    In each panel, per arm (line style): a thin line per task and the global loss in bold
    black — the mean over the arm's seeds with a ±1 std band when it has several; every
    resolution switch is a vertical line at ``epoch - 0.5``.

    Args:
        items: Runs (each its own arm) or arms.
        logy: Logarithmic loss axis (the default: the global loss is the sum of the task
            losses, several times larger than each).
        columns: Panels per row.
    """
    arms = as_arms(items)
    runs = _runs(arms)
    sizes = _sorted_sizes(s for run in runs for s in run.eval_sizes)
    tasks = _all_tasks(runs, {t for run in runs for t in run.tasks})
    colours = _task_colours(tasks)
    figure, axes_list = _new_figure(len(sizes), columns)
    for axes, size in zip(axes_list, sizes, strict=True):
        _style_axes(axes, f"val @ {size} px", logy)
        for i, arm in enumerate(arms):
            for task in tasks:
                curves = [run.val_series(size, task, LOSS) for run in arm.runs]
                _draw_curve(axes, curves, task, i, colours)
        _draw_switches(axes, runs, annotate=True)
    _title(figure, "Validation loss per task (thin) and global (bold)", arms)
    _legend(figure, arms, tasks)
    return figure


def plot_train_losses(items: Sequence[Run | Arm], logy: bool = True) -> Figure:
    """Training losses (each epoch at the size of its stage), per task and global."""
    arms = as_arms(items)
    runs = _runs(arms)
    tasks = _all_tasks(
        runs,
        {
            parts[1]
            for run in runs
            for parts in (c.split("/") for c in run.train.columns)
            if len(parts) == 3 and parts[0] == "train" and parts[2] == LOSS
        },
    )
    colours = _task_colours(tasks)
    figure, (axes,) = _new_figure(1, width=6.5)
    plans = []
    for run in runs:
        sizes = [s.before for s in run.switches[:1]] + [s.after for s in run.switches]
        plans.append(" → ".join(str(s) for s in sizes) + " px" if sizes else "one size")
    _style_axes(axes, f"train @ {' | '.join(dict.fromkeys(plans))}", logy)
    for i, arm in enumerate(arms):
        for task in tasks:
            _draw_curve(axes, [run.train_series(task) for run in arm.runs], task, i, colours)
    _draw_switches(axes, runs, annotate=True)
    _title(figure, "Training loss per task (thin) and global (bold)", arms)
    if tasks:
        _legend(figure, arms, tasks)
    return figure


VERDICT_COLOURS = {BETTER: "#1a9641", WORSE: "#d7191c", NO_DIFFERENCE: "0.45"}


def plot_differences(comparisons: pd.DataFrame) -> Figure:
    """Every difference (arm − reference) with its interval: one panel per eval size and
    kind (scores, losses); green = better, red = worse, grey = no detectable difference."""
    sizes = sorted(comparisons["size"].unique())
    kinds = [("scores (higher is better)", True), ("losses (lower is better)", False)]
    rows_per_kind = {
        kind: comparisons[comparisons["metric"].map(is_score) == score] for kind, score in kinds
    }
    height = max(len(p) for p in rows_per_kind.values()) / max(len(sizes), 1)
    figure = Figure(
        figsize=(5.4 * len(sizes) + 1.5, 2.2 + 0.32 * height * 2 + 1.2),
        dpi=DPI,
        layout="constrained",
        facecolor="white",
    )
    FigureCanvasAgg(figure)
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
                f"{r.task} {METRIC_SHORT.get(r.metric, r.metric)}"
                + (f" ({r.arm})" if comparisons["arm"].nunique() > 1 else "")
                for r in part.itertuples()
            ]
            y = np.arange(len(part))[::-1]
            for yi, r in zip(y, part.to_dict("records"), strict=True):
                colour = VERDICT_COLOURS[r["verdict"]]
                span = [r["difference low"], r["difference high"]]
                axes.plot(span, [yi, yi], color=colour, linewidth=2.2)
                axes.plot([r["difference"]], [yi], "o", color=colour, markersize=5)
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
    figure.legend(handles, list(VERDICT_COLOURS), loc="outside lower center", ncols=3, fontsize=9)
    return figure


METRIC_SHORT = {
    "iou": "IoU",
    "dice": "Dice",
    "top1": "top-1",
    "top5": "top-5",
    "f1": "F1",
    "loss": "loss",
}


def plot_study(table: pd.DataFrame, confidence: float) -> Figure:
    """Label efficiency: each task's main metric and loss (largest eval size) against the label
    fraction, one line per arm with its interval (seeds and images); a star above a fraction
    where an arm differs detectably from the reference (filled: better, open: worse)."""
    size = max(table["size"])
    at_size = table[table["size"] == size]
    tasks = list(dict.fromkeys(at_size["task"]))
    reference = table.attrs.get("reference", at_size["reference"].iloc[0])
    arms = [reference, *[a for a in dict.fromkeys(at_size["arm"]) if a != reference]]
    figure = Figure(
        figsize=(10.5, 2.9 * len(tasks) + 0.8), dpi=DPI, layout="constrained", facecolor="white"
    )
    FigureCanvasAgg(figure)
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
                    # above every interval at that fraction, clear of the other arms' bars
                    tops = rows.groupby("fraction")[["high", "reference high"]].max().max(axis=1)
                    lift = 0.04 * (tops.max() - rows[["low", "reference low"]].min().min())
                    for r in own.itertuples():
                        if r.verdict == NO_DIFFERENCE:
                            continue
                        axes.plot(
                            [r.fraction * (1 + offset)],
                            [tops[r.fraction] + lift],
                            marker="*",
                            markersize=11,
                            linestyle="none",
                            markeredgecolor=colours[arm],
                            markerfacecolor=colours[arm] if r.verdict == BETTER else "white",
                            transform=axes.transData,
                        )
            axes.set_xscale("log")
            axes.set_xticks(fractions, [f"{f:g}%" for f in fractions])
            axes.minorticks_off()
            axes.grid(True, alpha=0.3)
            axes.set_title(f"{task}: {METRIC_SHORT.get(metric, metric)} @ {size} px", fontsize=10)
            axes.set_ylabel(METRIC_SHORT.get(metric, metric) + (" ↑" if is_score(metric) else " ↓"))
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
    labels += [f"better than {reference} (interval excludes 0)", f"worse than {reference}"]
    figure.legend(
        handles, labels, loc="outside lower center", ncols=min(len(labels), 4), fontsize=9
    )
    figure.suptitle(
        f"Label efficiency: mean over seeds, {confidence:.0%} intervals over seeds and images",
        x=0.02,
        ha="left",
    )
    return figure


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Saves a PNG without a timestamp or version in its metadata (byte-stable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI, facecolor="white", metadata={"Software": None})
    return path
