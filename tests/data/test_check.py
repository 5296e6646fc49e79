"""``check_dataset`` names every kind of bad input with its csv line and file."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ssl_mt.data.check import check_dataset, format_report, jpeg_defect
from ssl_mt.data.image_io import write_png


@pytest.fixture
def root(synthetic_root: Path, tmp_path: Path) -> Path:
    """A private copy of the shared dataset, free to damage."""
    return Path(shutil.copytree(synthetic_root, tmp_path / "data"))


def _table(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "labels.csv", dtype=str, keep_default_na=False)


def _save(root: Path, table: pd.DataFrame) -> None:
    table.to_csv(root / "labels.csv", index=False)


def _row_with(table: pd.DataFrame, column: str) -> int:
    """Index of the first row with a non-empty ``column`` cell."""
    return int(np.flatnonzero(table[column] != "")[0])


def _problems(root: Path, tasks) -> list[str]:
    report = check_dataset(root, tasks, workers=2)
    assert not report.ok
    return report.problems


def _only_problem(root: Path, tasks) -> str:
    problems = _problems(root, tasks)
    assert len(problems) == 1, problems
    return problems[0]


def test_clean_dataset_has_no_problems(synthetic_root: Path, default_tasks) -> None:
    report = check_dataset(synthetic_root, default_tasks)
    assert report.ok, report.problems
    assert report.n_rows == 48
    assert report.counts["samples"]["total"] == 48
    table = _table(synthetic_root)
    for task in default_tasks:
        assert report.counts[task.name]["total"] == (table[task.column] != "").sum()
        assert (
            report.counts[task.name]["train"] + report.counts[task.name]["val"]
            == (report.counts[task.name]["total"])
        )
    text = format_report(report)
    assert "no problems" in text
    for task in default_tasks:
        assert task.name in text


def test_missing_image_file(root: Path, default_tasks) -> None:
    table = _table(root)
    (root / table["image"][5]).unlink()
    problem = _only_problem(root, default_tasks)
    assert "row 7" in problem and table["image"][5] in problem and "not found" in problem


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image(root: Path, default_tasks, damage: str) -> None:
    table = _table(root)
    path = root / table["image"][3]
    data = path.read_bytes()
    path.write_bytes(b"not an image at all" if damage == "garbage" else data[: len(data) // 2])
    problem = _only_problem(root, default_tasks)
    assert "row 5" in problem and table["image"][3] in problem


def test_jpeg_defect_accepts_trailing_data(synthetic_root: Path) -> None:
    data = (synthetic_root / "images" / "00000.jpg").read_bytes()
    assert jpeg_defect(data) is None
    assert jpeg_defect(data + b"\x00" * 100 + b"\xff\xda appended junk") is None
    assert jpeg_defect(data[:-2]) is not None


@pytest.mark.parametrize(
    ("damage", "expected"),
    [("wrong_size", "64x64"), ("channels", "channels"), ("missing", "not found")],
)
def test_bad_mask(root: Path, default_tasks, damage: str, expected: str) -> None:
    table = _table(root)
    i = _row_with(table, "scalp_mask")
    path = root / table["scalp_mask"][i]
    if damage == "wrong_size":
        write_png(path, np.zeros((32, 48), np.uint8))
    elif damage == "channels":
        write_png(path, np.zeros((64, 64, 3), np.uint8))
    else:
        path.unlink()
    problem = _only_problem(root, default_tasks)
    assert f"row {i + 2}," in problem and "scalp_mask" in problem
    assert table["scalp_mask"][i] in problem and expected in problem


@pytest.mark.parametrize(
    ("column", "value", "expected"),
    [
        ("tone", "monk_11", "unknown class"),
        ("blur", "7", "out of range"),
        ("split", "training", "unknown split"),
    ],
)
def test_bad_cell(root: Path, default_tasks, column: str, value: str, expected: str) -> None:
    table = _table(root)
    i = _row_with(table, column)
    table.loc[i, column] = value
    _save(root, table)
    problem = _only_problem(root, default_tasks)
    assert f"row {i + 2}" in problem and "labels.csv" in problem
    assert expected in problem and value in problem


def test_duplicate_row(root: Path, default_tasks) -> None:
    table = _table(root)
    _save(root, pd.concat([table, table.iloc[[2]]], ignore_index=True))
    problem = _only_problem(root, default_tasks)
    assert f"row {len(table) + 2}" in problem and "duplicate of row 4" in problem
    assert table["image"][2] in problem


def test_missing_task_column(root: Path, default_tasks) -> None:
    _save(root, _table(root).drop(columns=["tone"]))
    problem = _only_problem(root, default_tasks)
    assert "'tone'" in problem and "labels.csv" in problem


def test_missing_manifest_or_image_column(root: Path, default_tasks) -> None:
    _save(root, _table(root).drop(columns=["image"]))
    assert "`image` column" in _only_problem(root, default_tasks)
    (root / "labels.csv").unlink()
    assert "no manifest" in _only_problem(root, default_tasks)


def test_every_problem_is_reported(root: Path, default_tasks) -> None:
    table = _table(root)
    for i in range(10):
        (root / table["image"][i]).unlink()
    report = check_dataset(root, default_tasks)
    assert len(report.problems) == 10
    text = format_report(report)
    for i in range(10):
        assert table["image"][i] in text


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ssl_mt.data", "check", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_exit_codes(root: Path, tmp_path: Path) -> None:
    clean = _cli(str(root))
    assert clean.returncode == 0, clean.stderr
    assert "no problems" in clean.stdout

    table = _table(root)
    (root / table["image"][0]).unlink()
    broken = _cli(str(root), "--workers", "1")
    assert broken.returncode == 1
    assert table["image"][0] in broken.stdout

    error = _cli(str(root), "--tasks", str(tmp_path / "missing.yaml"))
    assert error.returncode == 2
    assert "Traceback" not in error.stderr and "missing.yaml" in error.stderr
