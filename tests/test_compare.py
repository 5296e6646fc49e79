"""ssl_mt.compare on hand-written runs: known numbers in, exact table values out.

The fake runs follow Lightning's CSVLogger layout: one row per logging call (validation,
training and lr-monitor rows apart, empty cells elsewhere), columns sorted by name. Every
value is a dyadic fraction, so sums and differences are exact in floating point.

Both runs train 2 epochs at 64 px, then 2 epochs at 96 px (switch at epoch 2), and are
validated at 64 and 96 px every epoch.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ssl_mt.compare import (
    CompareError,
    Switch,
    comparison_table,
    jump_table,
    load_arms,
    load_choice,
    load_run,
    load_runs,
    markdown_report,
    plot_train_losses,
    plot_val_losses,
    summary_table,
    unique_names,
    write_report,
)
from ssl_mt.compare.__main__ import main as compare_main

REPO_ROOT = Path(__file__).resolve().parents[1]
SWITCH = "1: 64→96 px"
STAGES = [
    {"size": 64, "epochs": 2, "batch_size": 16, "aug_strength": 0.5},
    {"size": 96, "epochs": 2, "batch_size": 16, "aug_strength": 1.0},
]
TRAIN_SIZES = [64.0, 64.0, 96.0, 96.0]

# Validation curves, epochs 0..3. global = skin + tone, as the module logs it.
SCORES_A = {
    "skin/iou": [0.25, 0.5, 0.375, 0.4375],
    "skin/dice": [0.375, 0.625, 0.5, 0.5625],
    "tone/top1": [0.125, 0.25, 0.25, 0.375],
    "tone/top5": [0.5, 0.625, 0.75, 0.75],
    "tone/f1": [0.0625, 0.125, 0.1875, 0.25],
}
VAL_A = {
    **{f"val/64/{k}": v for k, v in SCORES_A.items()},
    "val/64/skin/loss": [1.0, 0.75, 0.875, 0.5],
    "val/64/tone/loss": [2.0, 1.5, 1.75, 1.25],
    "val/64/global/loss": [3.0, 2.25, 2.625, 1.75],
    "val/96/skin/iou": [0.125, 0.25, 0.5, 0.625],
    "val/96/skin/dice": [0.25, 0.375, 0.625, 0.75],
    "val/96/tone/top1": [0.125, 0.125, 0.25, 0.25],
    "val/96/tone/top5": [0.5, 0.5, 0.625, 0.75],
    "val/96/tone/f1": [0.0625, 0.0625, 0.125, 0.125],
    "val/96/skin/loss": [1.25, 1.0, 0.75, 0.625],
    "val/96/tone/loss": [2.5, 2.25, 2.0, 1.75],
    "val/96/global/loss": [3.75, 3.25, 2.75, 2.375],
}
VAL_B = {
    "val/64/skin/iou": [0.375, 0.5, 0.625, 0.5625],
    "val/64/skin/dice": [0.5, 0.625, 0.75, 0.6875],
    "val/64/tone/top1": [0.25, 0.25, 0.375, 0.5],
    "val/64/tone/top5": [0.625, 0.75, 0.75, 0.875],
    "val/64/tone/f1": [0.125, 0.125, 0.25, 0.3125],
    "val/64/skin/loss": [0.75, 0.5, 0.5625, 0.375],
    "val/64/tone/loss": [1.75, 1.25, 1.375, 1.0],
    "val/64/global/loss": [2.5, 1.75, 1.9375, 1.375],
    "val/96/skin/iou": [0.25, 0.375, 0.5, 0.5],
    "val/96/skin/dice": [0.375, 0.5, 0.625, 0.625],
    "val/96/tone/top1": [0.125, 0.25, 0.25, 0.375],
    "val/96/tone/top5": [0.5, 0.625, 0.75, 0.75],
    "val/96/tone/f1": [0.0625, 0.125, 0.125, 0.1875],
    "val/96/skin/loss": [1.0, 0.75, 0.625, 0.5],
    "val/96/tone/loss": [2.25, 2.0, 1.875, 1.5],
    "val/96/global/loss": [3.25, 2.75, 2.5, 2.0],
}
TRAIN_A = {
    "train/skin/loss": [1.5, 1.0, 0.875, 0.625],
    "train/tone/loss": [2.5, 2.0, 1.75, 1.5],
    "train/global/loss": [4.0, 3.0, 2.625, 2.125],
    "train/total_loss": [4.0, 3.0, 2.625, 2.125],
    "weights/skin": [1.0, 1.0, 1.0, 1.0],
    "weights/tone": [1.0, 1.0, 1.0, 1.0],
}
TRAIN_B = {
    "train/skin/loss": [1.25, 0.875, 0.75, 0.5],
    "train/tone/loss": [2.25, 1.75, 1.5, 1.25],
    "train/global/loss": [3.5, 2.625, 2.25, 1.75],
    "train/total_loss": [3.5, 2.625, 2.25, 1.75],
    "weights/skin": [1.0, 1.0, 1.0, 1.0],
    "weights/tone": [1.0, 1.0, 1.0, 1.0],
}
STEPS_PER_EPOCH = 4


def write_metrics_csv(
    path: Path,
    val: Mapping[str, Sequence[float]],
    train: Mapping[str, Sequence[float]],
    train_sizes: Sequence[float] | None = TRAIN_SIZES,
) -> Path:
    """Writes ``metrics.csv`` the way CSVLogger does: a row per logging call, blanks elsewhere.

    Per epoch: an lr-monitor row at the epoch's first step (no ``epoch``), a validation row
    and a training row at its last step.
    """
    train = dict(train)
    if train_sizes is not None:
        train["train/size"] = list(train_sizes)
        train["train/stage"] = [float(s != train_sizes[0]) for s in train_sizes]
    epochs = len(next(iter(val.values())))
    rows: list[dict[str, object]] = []
    for epoch in range(epochs):
        last = (epoch + 1) * STEPS_PER_EPOCH - 1
        rows.append({"step": epoch * STEPS_PER_EPOCH, "lr-AdamW/pg1": 0.001 * (epoch + 1)})
        rows.append({"epoch": epoch, "step": last, **{k: v[epoch] for k, v in val.items()}})
        rows.append({"epoch": epoch, "step": last, **{k: v[epoch] for k, v in train.items()}})
    columns = sorted({key for row in rows for key in row})
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_config(run_dir: Path, experiment_name: str, stages: Sequence[Mapping] = STAGES) -> Path:
    """A ``.hydra/config.yaml`` as a finetune run writes it (the keys compare reads, and an
    interpolation that only resolves inside Hydra)."""
    lines = [
        "app: finetune",
        f"experiment_name: {experiment_name}",
        "seed: 0",
        "run_dir: ${hydra:runtime.output_dir}",
        "tasks:",
        "  skin:",
        "    kind: segmentation",
        "    column: skin_mask",
        "  tone:",
        "    kind: classification",
        "    column: tone",
        "schedule:",
        "  stages:",
    ]
    for stage in stages:
        lines.append(f"  - size: {stage['size']}")
        lines += [f"    {k}: {v}" for k, v in stage.items() if k != "size"]
    lines += ["  eval_sizes:", "  - 64", "  - 96"]
    path = run_dir / ".hydra" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_run(
    run_dir: Path,
    experiment_name: str,
    val: Mapping[str, Sequence[float]] = VAL_A,
    train: Mapping[str, Sequence[float]] = TRAIN_A,
    train_sizes: Sequence[float] | None = TRAIN_SIZES,
    config: bool = True,
) -> Path:
    """A fake finetune run directory: ``metrics.csv`` and ``.hydra/config.yaml``."""
    write_metrics_csv(run_dir / "metrics.csv", val, train, train_sizes)
    if config:
        write_config(run_dir, experiment_name)
    return run_dir


def make_two_runs(root: Path) -> tuple[Path, Path]:
    """The runs ``mt`` (values A) and ``mt_ssl`` (values B) under ``root``."""
    return (
        make_run(root / "mt", "mt", VAL_A, TRAIN_A),
        make_run(root / "mt_ssl", "mt_ssl", VAL_B, TRAIN_B),
    )


@pytest.fixture
def two_runs(tmp_path: Path) -> tuple[Path, Path]:
    return make_two_runs(tmp_path / "runs")


# -- loading -----------------------------------------------------------------------------------
def test_load_run_reads_csvlogger_layout(two_runs: tuple[Path, Path]) -> None:
    run = load_run(two_runs[0])
    assert run.name == "mt"
    assert run.path == two_runs[0]
    assert run.config["experiment_name"] == "mt"
    assert list(run.val.index) == [0, 1, 2, 3]
    assert run.val["val/64/skin/iou"].tolist() == VAL_A["val/64/skin/iou"]
    assert run.val["val/96/global/loss"].tolist() == VAL_A["val/96/global/loss"]
    assert not any(c.startswith("train/") for c in run.val.columns)
    assert run.train["train/global/loss"].tolist() == TRAIN_A["train/global/loss"]
    assert run.train["train/size"].tolist() == TRAIN_SIZES
    assert "lr-AdamW/pg1" not in run.train.columns
    assert run.switches == [Switch(epoch=2, before=64, after=96)]
    assert run.switch_epochs == [2]
    assert run.eval_sizes == [64, 96]
    assert run.tasks == ["skin", "tone", "global"]


def test_switches_from_config_when_size_not_logged(tmp_path: Path) -> None:
    run = load_run(make_run(tmp_path / "r", "mt", train_sizes=None))
    assert "train/size" not in run.train.columns
    assert run.switches == [Switch(epoch=2, before=64, after=96)]


def test_logged_size_wins_over_config(tmp_path: Path) -> None:
    # The config says 2 + 2 epochs, but the run switched at epoch 3 (e.g. edited on resume).
    run = load_run(make_run(tmp_path / "r", "mt", train_sizes=[64.0, 64.0, 64.0, 96.0]))
    assert run.switches == [Switch(epoch=3, before=64, after=96)]


def test_no_config_names_run_by_folder(tmp_path: Path) -> None:
    run = load_run(make_run(tmp_path / "2024-01-01_00-00-00", "x", config=False))
    assert run.name == "2024-01-01_00-00-00"
    assert run.config == {}
    assert run.switches == [Switch(epoch=2, before=64, after=96)]


def test_last_value_of_a_repeated_epoch_wins(tmp_path: Path) -> None:
    # A resumed run logs epoch 1 again: the later row is the one that counts.
    path = make_run(tmp_path / "r", "mt") / "metrics.csv"
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    row = dict.fromkeys(header, "")
    row.update({"epoch": "1", "step": "99", "val/64/skin/iou": "0.875"})
    path.write_text("\n".join([*lines, ",".join(row[c] for c in header)]) + "\n")
    run = load_run(path.parent)
    assert run.val["val/64/skin/iou"].tolist() == [0.25, 0.875, 0.375, 0.4375]
    assert run.val["val/64/skin/loss"].tolist() == VAL_A["val/64/skin/loss"]


def test_names_from_config_cli_and_duplicates(tmp_path: Path) -> None:
    a = make_run(tmp_path / "a", "mt")
    b = make_run(tmp_path / "b", "mt")
    c = make_run(tmp_path / "c", "mt")
    assert [r.name for r in load_runs([a, b, c])] == ["mt", "mt_2", "mt_3"]
    assert [r.name for r in load_runs([a, b], names=["MT", "MT+SSL"])] == ["MT", "MT+SSL"]
    assert [r.name for r in load_runs([a, b], names=["x", "x"])] == ["x", "x_2"]
    assert unique_names(["a", "a", "a_2"]) == ["a", "a_3", "a_2"]


# -- tables ------------------------------------------------------------------------------------
def test_summary_table_exact_values(two_runs: tuple[Path, Path]) -> None:
    runs = load_runs(two_runs)
    table = summary_table(runs)
    assert list(table.columns) == [
        ("final", "mt"),
        ("final", "mt_ssl"),
        ("Δ final", "mt_ssl − mt"),
        ("best", "mt"),
        ("best", "mt_ssl"),
        ("Δ best", "mt_ssl − mt"),
        ("best epoch", "mt"),
        ("best epoch", "mt_ssl"),
    ]
    expected_rows = [
        (size, task, metric)
        for size in (64, 96)
        for task, metrics in (
            ("skin", ("iou", "dice", "loss")),
            ("tone", ("top1", "top5", "f1", "loss")),
            ("global", ("loss",)),
        )
        for metric in metrics
    ]
    assert list(table.index) == expected_rows

    iou = table.loc[(64, "skin", "iou")]
    assert iou[("final", "mt")] == 0.4375
    assert iou[("final", "mt_ssl")] == 0.5625
    assert iou[("Δ final", "mt_ssl − mt")] == 0.125
    assert iou[("best", "mt")] == 0.5  # max of a score
    assert iou[("best", "mt_ssl")] == 0.625
    assert iou[("Δ best", "mt_ssl − mt")] == 0.125
    assert iou[("best epoch", "mt")] == 1
    assert iou[("best epoch", "mt_ssl")] == 2

    top5 = table.loc[(96, "tone", "top5")]
    assert (top5[("final", "mt")], top5[("best", "mt")], top5[("best epoch", "mt")]) == (
        0.75,
        0.75,
        3,
    )
    assert top5[("Δ final", "mt_ssl − mt")] == 0.0

    loss = table.loc[(64, "global", "loss")]
    assert loss[("final", "mt")] == 1.75
    assert loss[("final", "mt_ssl")] == 1.375
    assert loss[("Δ final", "mt_ssl − mt")] == -0.375
    assert loss[("best", "mt")] == 1.75  # min of a loss
    assert loss[("best epoch", "mt")] == 3

    tone_loss = table.loc[(96, "tone", "loss")]
    assert tone_loss[("best", "mt_ssl")] == 1.5
    assert tone_loss[("Δ best", "mt_ssl − mt")] == -0.25


def test_jump_table_exact_values(two_runs: tuple[Path, Path]) -> None:
    table = jump_table(load_runs(two_runs))
    assert list(table.columns) == [
        ("jump", "mt"),
        ("jump", "mt_ssl"),
        ("Δ jump", "mt_ssl − mt"),
        ("before", "mt"),
        ("before", "mt_ssl"),
        ("after", "mt"),
        ("after", "mt_ssl"),
    ]
    assert list(table.index) == [
        (SWITCH, size, task) for size in (64, 96) for task in ("skin", "tone", "global")
    ]
    g64 = table.loc[(SWITCH, 64, "global")]
    # mt: val/64/global/loss 2.25 at epoch 1 (last at 64 px) -> 2.625 at epoch 2.
    assert (g64[("before", "mt")], g64[("after", "mt")], g64[("jump", "mt")]) == (
        2.25,
        2.625,
        0.375,
    )
    assert g64[("jump", "mt_ssl")] == 0.1875
    assert g64[("Δ jump", "mt_ssl − mt")] == -0.1875  # SSL: the smaller jump
    skin64 = table.loc[(SWITCH, 64, "skin")]
    assert skin64[("jump", "mt")] == 0.125
    assert skin64[("jump", "mt_ssl")] == 0.0625
    assert skin64[("Δ jump", "mt_ssl − mt")] == -0.0625
    g96 = table.loc[(SWITCH, 96, "global")]
    assert g96[("jump", "mt")] == -0.5
    assert g96[("jump", "mt_ssl")] == -0.25
    assert g96[("Δ jump", "mt_ssl − mt")] == 0.25
    tone96 = table.loc[(SWITCH, 96, "tone")]
    assert tone96[("jump", "mt")] == -0.25
    assert tone96[("Δ jump", "mt_ssl − mt")] == 0.125


def test_differences_of_each_further_run_to_the_first(tmp_path: Path) -> None:
    a = make_run(tmp_path / "a", "mt", VAL_A, TRAIN_A)
    b = make_run(tmp_path / "b", "mt_ssl", VAL_B, TRAIN_B)
    c = make_run(tmp_path / "c", "mt_ssl_b", VAL_A, TRAIN_A)
    runs = load_runs([a, b, c])
    table = summary_table(runs)
    assert [c for c in table.columns if c[0] == "Δ final"] == [
        ("Δ final", "mt_ssl − mt"),
        ("Δ final", "mt_ssl_b − mt"),
    ]
    assert table.loc[(64, "skin", "iou"), ("Δ final", "mt_ssl − mt")] == 0.125
    assert table.loc[(64, "skin", "iou"), ("Δ final", "mt_ssl_b − mt")] == 0.0
    jumps = jump_table(runs)
    assert jumps.loc[(SWITCH, 64, "global"), ("Δ jump", "mt_ssl − mt")] == -0.1875
    assert jumps.loc[(SWITCH, 64, "global"), ("Δ jump", "mt_ssl_b − mt")] == 0.0


def test_single_run_and_no_switch(tmp_path: Path) -> None:
    one = make_run(tmp_path / "a", "mt", train_sizes=[64.0] * 4, config=False)
    runs = load_runs([one])
    assert runs[0].switches == []
    assert jump_table(runs).empty
    table = summary_table(runs)
    assert not any(c[0].startswith("Δ") for c in table.columns)
    assert "no jump to measure" in markdown_report(runs)


def test_table_keeps_only_common_metrics(tmp_path: Path) -> None:
    b_val = {k: v for k, v in VAL_B.items() if not k.startswith("val/96/")}
    a = make_run(tmp_path / "a", "mt", VAL_A)
    b = make_run(tmp_path / "b", "mt_ssl", b_val)
    table = summary_table(load_runs([a, b]))
    assert set(table.index.get_level_values("size")) == {64}


def test_markdown_report(two_runs: tuple[Path, Path]) -> None:
    text = markdown_report(load_runs(two_runs), {"val": "val_loss.png"})
    assert "![val](val_loss.png)" in text
    assert "| 1: 64→96 px | 64 | global | +0.3750 | +0.1875 | -0.1875 | 2.2500 |" in text
    # no verdict from the sign of one difference: the claims carry intervals (claims.py)
    assert "smaller for" not in text and "larger for" not in text
    assert "### val @ 64 px" in text and "### val @ 96 px" in text
    assert (
        "| skin | IoU ↑ | 0.4375 | 0.5625 | +0.1250 | 0.5000 | 0.6250 | +0.1250 | 1 | 2 |" in text
    )
    assert "| global | loss ↓ | 1.7500 | 1.3750 | -0.3750 |" in text


# -- figures and files ---------------------------------------------------------------------------
def test_plots(two_runs: tuple[Path, Path]) -> None:
    runs = load_runs(two_runs)
    figure = plot_val_losses(runs)
    panels = [a for a in figure.axes if a.get_visible()]
    assert [a.get_title() for a in panels] == ["val @ 64 px", "val @ 96 px"]
    for axes in panels:
        assert axes.get_xlabel() == "epoch"
        assert axes.get_ylabel().startswith("loss")
        curves = [line for line in axes.get_lines() if len(line.get_xdata()) == 4]
        assert len(curves) == 2 * 3  # two runs x (skin, tone, global)
        bold = [line for line in curves if line.get_linewidth() > 2]
        assert len(bold) == 2  # the global loss of each run
        switches = [line for line in axes.get_lines() if list(line.get_xdata()) == [1.5, 1.5]]
        assert len(switches) == 1  # between epoch 1 (64 px) and epoch 2 (96 px)
    assert figure.legends, "the figure needs a legend"
    labels = [t.get_text() for t in figure.legends[0].get_texts()]
    assert "run: mt" in labels and "run: mt_ssl" in labels and "resolution switch" in labels

    train = plot_train_losses(runs)
    (axes,) = [a for a in train.axes if a.get_visible()]
    assert axes.get_title() == "train @ 64 → 96 px"
    assert len([line for line in axes.get_lines() if len(line.get_xdata()) == 4]) == 6


def test_write_report_files(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    runs = load_runs(two_runs)
    paths = write_report(runs, tmp_path / "report")
    for key in ("val_loss", "train_loss"):
        data = paths[key].read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000
    report = paths["report"].read_text(encoding="utf-8")
    assert "![validation loss per resolution](val_loss.png)" in report
    assert "![training loss](train_loss.png)" in report
    assert paths["summary"].is_file() and paths["jumps"].is_file()
    # Deterministic: the same runs give byte-identical files.
    again = write_report(runs, tmp_path / "again")
    for key in ("val_loss", "train_loss", "summary", "jumps"):
        assert paths[key].read_bytes() == again[key].read_bytes(), key


# -- errors ------------------------------------------------------------------------------------
def test_error_not_a_run(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(CompareError, match=r"not a run, no metrics\.csv") as info:
        load_run(folder)
    assert str(folder) in str(info.value)
    with pytest.raises(CompareError, match="no such folder"):
        load_run(tmp_path / "missing")


def test_error_no_validation_logs(tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    write_metrics_csv(run_dir / "metrics.csv", {"x/unused": [1.0, 2.0]}, {}, [64.0, 64.0])
    with pytest.raises(CompareError, match="no validation logs") as info:
        load_run(run_dir)
    assert str(run_dir / "metrics.csv") in str(info.value)


def test_error_no_metric_in_common(tmp_path: Path) -> None:
    a = make_run(tmp_path / "a", "mt", {k: v for k, v in VAL_A.items() if "/64/" in k})
    b = make_run(tmp_path / "b", "mt_ssl", {k: v for k, v in VAL_B.items() if "/96/" in k})
    with pytest.raises(CompareError, match="no validation metric in common") as info:
        load_runs([a, b])
    assert str(a) in str(info.value) and str(b) in str(info.value)


def test_error_wrong_number_of_names(two_runs: tuple[Path, Path]) -> None:
    with pytest.raises(CompareError, match="1 name"):
        load_runs(two_runs, names=["only"])


# -- command line ------------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MPLBACKEND": "Agg"}
    return subprocess.run(
        [sys.executable, "-m", "ssl_mt.compare", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _main(capsys: pytest.CaptureFixture, *args: str) -> subprocess.CompletedProcess:
    """The command line in this process (cheaper than a subprocess), as ``_cli`` returns it."""
    code = compare_main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def test_cli_writes_report(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _cli(*map(str, two_runs), "--out", str(out), "--names", "MT", "MT+SSL")
    assert result.returncode == 0, result.stderr
    assert f"report: {out / 'report.md'}" in result.stdout
    assert (out / "val_loss.png").stat().st_size > 0
    assert (out / "train_loss.png").stat().st_size > 0
    assert "Δ jump MT+SSL − MT" in (out / "report.md").read_text(encoding="utf-8")


def test_cli_errors_exit_2_without_traceback(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    not_a_run = tmp_path / "nothing"
    not_a_run.mkdir()
    result = _cli(str(two_runs[0]), str(not_a_run), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert str(not_a_run) in result.stderr and "no metrics.csv" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()

    result = _cli(*map(str, two_runs), "--out", str(tmp_path / "o"), "--names", "one")
    assert result.returncode == 2 and "Traceback" not in result.stderr

    result = _cli(str(two_runs[0]))  # --out missing: argparse's usage error
    assert result.returncode == 2 and "--out" in result.stderr


# -- arms of seeds, evaluation records, verdicts -----------------------------------------------------
IMAGES = [f"images/{i:04d}.png" for i in range(120)]


RECORDED = (("best", "val"), ("best", "test"), ("last", "val"), ("last", "test"))


def write_fake_records(
    run_dir: Path, quality: float, seed: int, sizes=(64, 96), recorded=RECORDED
) -> None:
    """Per-image records of a run at both sizes for tasks skin (segmentation) and tone
    (10 classes); ``quality`` shifts every image towards right (IoU, top-1 up, loss down).
    Image difficulty is shared by every run (the same images); the rest is per run. The
    same records stand for every (checkpoint, split) of ``recorded``."""
    from ssl_mt.evaluation.records import as_records, records_path, write_records

    shared = np.random.default_rng(0)
    difficulty = shared.normal(0.0, 1.0, len(IMAGES))
    tone_target = shared.integers(0, 10, len(IMAGES))
    rng = np.random.default_rng(1000 + seed)
    for size in sizes:
        p = 1 / (1 + np.exp(-(quality + difficulty + rng.normal(0, 0.3, len(IMAGES)))))
        pixels = size * size // 4
        tp = np.round(p * pixels).astype(int)
        skin = pd.DataFrame(
            {
                "image": IMAGES,
                "task": "skin",
                "loss": 1.0 - p,
                "tp": tp,
                "fp": pixels - tp,
                "fn": (pixels - tp) // 2,
                "tn": size * size - 2 * pixels,
            }
        )
        correct = rng.random(len(IMAGES)) < p
        pred = np.where(correct, tone_target, (tone_target + 1) % 10)
        tone = pd.DataFrame(
            {
                "image": IMAGES[:100],  # 20 images without a tone label
                "task": "tone",
                "loss": (2.0 - p)[:100],
                "target": tone_target[:100],
                "pred": pred[:100],
                "top5": correct[:100].astype(int),
            }
        )
        for checkpoint, split in recorded:
            write_records(as_records([skin, tone]), records_path(run_dir, checkpoint, split, size))


def make_arm(root: Path, name: str, quality: float, seeds: int, multirun: bool) -> Path:
    """``seeds`` fake runs with records: numbered subfolders of a multirun folder, or apart."""
    folder = root / name
    for seed in range(seeds):
        run_dir = folder / str(seed) if multirun else root / f"{name}_{seed}"
        make_run(run_dir, name, VAL_A if quality < 1 else VAL_B)
        write_fake_records(run_dir, quality, seed + (100 if quality >= 1 else 0))
    return folder


def test_cli_arms_of_seeds_print_the_verdict(tmp_path: Path) -> None:
    mt = make_arm(tmp_path, "mt", 0.0, 3, multirun=True)  # a Hydra multirun folder
    make_arm(tmp_path, "ssl", 1.5, 3, multirun=False)
    ssl = ",".join(str(tmp_path / f"ssl_{s}") for s in range(3))
    out = tmp_path / "out"
    result = _cli(
        "--arm", f"MT={mt}", "--arm", f"MT+SSL={ssl}", "--out", str(out), "--bootstrap", "400"
    )
    assert result.returncode == 0, result.stderr
    stdout = result.stdout
    assert (
        "Verdict per task (96 px, main metric; test/best (best chosen on val" in stdout
        and "seeds: MT 3, MT+SSL 3" in stdout
    )
    lines = {
        line.split("|")[1].strip(): line for line in stdout.splitlines() if line.startswith("| ")
    }
    assert "IoU ↑" in lines["skin"] and lines["skin"].rstrip(" |").endswith("better")
    assert "top-1 ↑" in lines["tone"] and lines["tone"].rstrip(" |").endswith("better")
    assert "loss ↓" in lines["global"] and lines["global"].rstrip(" |").endswith("better")
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "## Differences between arms (MT is the reference)" in report
    assert "![differences with their intervals](differences.png)" in report
    table = pd.read_csv(out / "comparisons.csv")
    tone = table[(table["task"] == "tone") & (table["size"] == 96)]
    assert set(tone["metric"]) == {"top1", "top5", "f1", "loss"}
    assert (tone["images"] == 100).all() and (tone["reference seeds"] == 3).all()
    row = tone[tone["metric"] == "top1"].iloc[0]
    assert row["difference low"] > 0 and row["low"] < row["value"] < row["high"]
    assert row["std"] > 0  # over the 3 seeds
    for name in ("val_loss.png", "differences.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")


def test_a_a_arms_find_no_difference(tmp_path: Path) -> None:
    """Two arms of the same setup, each 3 runs of its own seeds (the same quality): the
    adjusted family finds nothing, and the intervals are not degenerate."""
    for name, offset in (("a", 0), ("b", 10)):
        for seed in range(3):
            run_dir = tmp_path / name / str(seed)
            make_run(run_dir, name)
            write_fake_records(run_dir, 0.0, seed + offset)
    arms = load_arms([("A", [tmp_path / "a"]), ("B", [tmp_path / "b"])])
    table = comparison_table(arms, load_choice({"iterations": 1000}))
    assert not table.empty and (table["difference"] != 0).any()
    family = table[table["adjustment"] != "unadjusted"]
    assert len(family) == 3  # skin IoU, tone top-1, global loss at 96 px
    assert (family["verdict"] == "no detectable difference").all(), family
    assert (table["difference low"] < table["difference high"]).all()
    assert table["method"].all() and table["seed variance"].all()


def test_runs_without_records_get_no_verdict(
    capsys: pytest.CaptureFixture, two_runs: tuple[Path, Path], tmp_path: Path
) -> None:
    result = _main(capsys, *map(str, two_runs), "--out", str(tmp_path / "o"))
    assert result.returncode == 0, result.stderr
    assert "no verdict: some runs have no per-image evaluation records" in result.stdout
    report = (tmp_path / "o" / "report.md").read_text(encoding="utf-8")
    assert "No per-image evaluation records" in report and str(two_runs[0]) in report


def test_bad_arm_spec_and_mixed_arguments_exit_2(
    capsys: pytest.CaptureFixture, two_runs: tuple[Path, Path], tmp_path: Path
) -> None:
    result = _main(capsys, "--arm", "noequals", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "NAME=RUN_DIR" in result.stderr
    result = _main(
        capsys, str(two_runs[0]), "--arm", f"B={two_runs[1]}", "--out", str(tmp_path / "o")
    )
    assert result.returncode == 2 and "not both" in result.stderr


# -- label-efficiency study ---------------------------------------------------------------------------
def test_study_draws_label_efficiency(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    study = tmp_path / "study"
    for arm, gain in (("mt", 0.0), ("mt_ssl", 2.0)):
        for fraction, base in ((5, -1.0), (25, 0.0), (100, 1.0)):
            for seed in range(2):
                run_dir = study / arm / f"frac{fraction:03d}" / f"seed{seed}"
                # SSL helps at 5% only: the gain fades with more labels.
                quality = base + (gain if fraction == 5 else 0.0)
                write_fake_records(
                    run_dir, quality, seed + (50 if arm == "mt_ssl" else 0), sizes=(64,)
                )
    for seed in range(2):  # an arm at one fraction only, first by name: mt stays the reference
        write_fake_records(
            study / "imagenet" / "frac005" / f"seed{seed}", -0.5, 70 + seed, sizes=(64,)
        )
    out = tmp_path / "out"
    # 2000 replicates: p-values down to 0.001, below Holm's first threshold 0.05 / 12; with
    # 2 seeds per arm the seed part is a t(2) draw, so only a large gain survives Holm.
    result = _main(capsys, "study", str(study), "--out", str(out), "--bootstrap", "2000")
    assert result.returncode == 0, result.stderr
    text = (out / "study.md").read_text(encoding="utf-8")
    assert "![label efficiency](study.png)" in text
    assert "### skin: IoU ↑ @ 64 px (120 images)" in text
    # the verdicts open the report and are what the command prints: main metrics only
    summary = text.split("## Every metric and eval size")[0]
    assert "## Verdict per task and label fraction (64 px, main metric; test/best" in summary
    assert "seeds: mt 2, imagenet 2, mt_ssl 2" in summary
    assert "Family: main metric per task and global loss @ 64 px × label fractions (12 tests)" in (
        summary
    )
    assert "Holm" in summary and "Seed-to-seed" not in summary
    rows = [line.split("|")[1:-1] for line in summary.splitlines() if line.startswith("| ")]
    cells = {(r[0].strip(), r[2].strip(), r[4].strip()): r[-1].strip() for r in rows[1:]}
    assert cells[("skin", "5%", "mt_ssl")] == "better"
    assert cells[("skin", "100%", "mt_ssl")] == "no detectable difference"
    assert ("skin", "5%", "imagenet") in cells and ("skin", "25%", "imagenet") not in cells
    assert {r[1].strip() for r in rows[1:] if r[0].strip() == "skin"} == {"IoU ↑"}
    assert {r[1].strip() for r in rows[1:] if r[0].strip() == "global"} == {"loss ↓"}
    assert "Verdict per task and label fraction" in result.stdout
    assert "### skin" not in result.stdout
    table = pd.read_csv(out / "study.csv")
    assert sorted(table["fraction"].unique()) == [5.0, 25.0, 100.0]
    assert (table["reference"] == "mt").all()
    assert set(table.loc[table["arm"] == "imagenet", "fraction"]) == {5.0}
    skin = table[(table["task"] == "skin") & (table["metric"] == "iou")]
    iou = skin[skin["arm"] == "mt_ssl"].set_index("fraction")
    assert iou.loc[5.0, "verdict"] == "better"
    assert iou.loc[100.0, "verdict"] == "no detectable difference"
    assert iou.loc[5.0, "value"] > iou.loc[5.0, "reference value"]
    assert (out / "study.png").read_bytes().startswith(b"\x89PNG")
    assert "| 5% | mt_ssl | 2 |" in text


def test_study_layout_errors(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    (tmp_path / "s" / "mt" / "frac5x" / "seed0").mkdir(parents=True)
    result = _main(capsys, "study", str(tmp_path / "s"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "frac<PCT>" in result.stderr
    (tmp_path / "t" / "mt" / "frac005" / "seed0").mkdir(parents=True)
    result = _main(capsys, "study", str(tmp_path / "t"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "no evaluation records" in result.stderr
