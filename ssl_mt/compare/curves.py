"""Loss curves of runs and arms: validation (a panel per eval size) and training, per task
and global, with ±1 std bands over seeds, resolution switches and a legend of tasks and runs."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import Formatter, FuncFormatter

from ssl_mt.compare.arms import Arm, as_arms
from ssl_mt.compare.figures import RUN_MARKERS, TASK_COLOURS, blank_figure
from ssl_mt.compare.keys import GLOBAL, LOSS, _all_tasks, _sorted_sizes
from ssl_mt.compare.run import Run

RUN_STYLES = ("-", "--", ":", "-.")
GLOBAL_COLOUR = "black"
SWITCH_COLOUR = "0.45"


def _new_figure(panels: int, columns: int = 3, width: float = 5.2) -> tuple[Figure, list[Axes]]:
    columns = max(1, min(columns, panels))
    rows = math.ceil(panels / columns)
    figure = blank_figure((width * columns + 2.8, 3.9 * rows + 0.4))
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
