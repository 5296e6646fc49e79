"""What every comparison figure shares: resolution, palette, markers, a blank white figure
on the Agg canvas, and byte-stable PNG saving."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

RUN_MARKERS = ("o", "s", "^", "D", "v", "P")
# The palette: tasks in the loss curves, arms in the study plot.
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
DPI = 110


def blank_figure(figsize: tuple[float, float]) -> Figure:
    """A white, constrained-layout figure drawn by Agg (no pyplot, no global state)."""
    figure = Figure(figsize=figsize, dpi=DPI, layout="constrained", facecolor="white")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Saves a PNG without a timestamp or version in its metadata (byte-stable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI, facecolor="white", metadata={"Software": None})
    return path
