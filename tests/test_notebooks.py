"""The notebooks run top to bottom on small runs and data made here, and are stored clean.

Each notebook is executed with nbclient in a ``python3`` kernel pinned to the interpreter
running the tests (a kernelspec written to a temporary ``JUPYTER_PATH``, which takes
precedence over user and system kernelspecs), with the working directory ``notebooks/`` as
in Jupyter. The runs come from ``test_compare``'s fake-run helpers, the data from the
synthetic generator; the notebooks find them through ``SSL_MT_RUNS`` / ``SSL_MT_DATA``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers import write_fake_curves

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from ssl_mt.data.synthetic import generate_dataset  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO_ROOT / "notebooks"
COMPARE_NB = NOTEBOOKS / "compare_loss_curves.ipynb"
EXPLORE_NB = NOTEBOOKS / "explore_dataset.ipynb"
CELL_TIMEOUT_S = 120


def _test_compare() -> ModuleType:
    """``tests/test_compare.py`` as a module (the suite imports tests by path, no package)."""
    path = Path(__file__).with_name("test_compare.py")
    spec = importlib.util.spec_from_file_location("_ssl_mt_test_compare_helpers", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def this_python_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A ``python3`` kernelspec that runs ``sys.executable``, found before any other."""
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (tests)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.delenv("MPLBACKEND", raising=False)
    return "python3"


def execute(path: Path | dict, kernel_name: str) -> nbformat.NotebookNode:
    """Runs every cell in ``notebooks/``; raises CellExecutionError naming the failing cell."""
    nb = nbformat.read(path, as_version=4) if isinstance(path, Path) else nbformat.from_dict(path)
    client = nbclient.NotebookClient(
        nb,
        kernel_name=kernel_name,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()
    return nb


def outputs_of(nb: nbformat.NotebookNode, mime: str) -> list:
    return [
        output["data"][mime]
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if mime in output.get("data", {})
    ]


def test_kernel_is_this_python(this_python_kernel: str) -> None:
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("import sys, ssl_mt\nprint(sys.executable)")]
    )
    ran = execute(dict(nb), this_python_kernel)
    printed = "".join(o.get("text", "") for o in ran.cells[0].outputs).strip()
    assert Path(printed).absolute() == Path(sys.executable).absolute()


@pytest.mark.parametrize("path", [COMPARE_NB, EXPLORE_NB], ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


def test_compare_notebook_uses_only_ssl_mt_compare() -> None:
    nb = nbformat.read(COMPARE_NB, as_version=4)
    first = nb.cells[0]
    assert first.cell_type == "code" and "RUN_DIRS = [" in first.source
    assert "SSL_MT_RUNS" in first.source
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "from ssl_mt.compare import" in code
    for forbidden in ("matplotlib.pyplot", "read_csv", ".plot(", "subplots"):
        assert forbidden not in code, f"the notebook must call ssl_mt.compare, not {forbidden}"


def test_compare_notebook_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, this_python_kernel: str
) -> None:
    helpers = _test_compare()
    runs = helpers.make_two_runs(tmp_path / "runs")
    curves = ([3.0, 2.5, 2.8, 2.2], [2.8, 2.3, 2.4, 2.0])  # the switch at epoch 2
    for seed, (run, quality, mean) in enumerate(zip(runs, (0.0, 1.5), curves, strict=True)):
        helpers.write_fake_records(run, quality, seed)  # per-image records: intervals
        write_fake_curves(run, mean, seed)  # per-image curves: the claims' intervals
    monkeypatch.setenv("SSL_MT_RUNS", os.pathsep.join(str(r) for r in runs))
    nb = execute(COMPARE_NB, this_python_kernel)
    assert len(outputs_of(nb, "image/png")) >= 3  # validation, training, differences
    markdown = "\n".join(outputs_of(nb, "text/markdown"))
    assert "Verdict per task (96 px, main metric; test/best (best chosen on val" in markdown
    assert "| skin | IoU ↑ |" in markdown and "| these runs differ: better |" in markdown
    assert "Seed-to-seed variance is not covered" in markdown  # one seed per arm
    assert "Family: main metric per task and global loss @ 96 px" in markdown
    assert "## The claims about the curves" in markdown and "jump (64→96 px at epoch 2)" in markdown
    assert "Per-run jumps of the logged validation loss" in markdown
    assert "| 1: 64→96 px | 64 | global | +0.3750 | +0.1875 | -0.1875 |" in markdown
    printed = "\n".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )
    assert "mt_ssl:" in printed and "64→96 px at epoch 2" in printed


def test_explore_notebook_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, this_python_kernel: str
) -> None:
    root = generate_dataset(tmp_path / "data", n=24, size=64, workers=1, progress=False)
    monkeypatch.setenv("SSL_MT_DATA", str(root))
    nb = execute(EXPLORE_NB, this_python_kernel)
    # The preview grid, the coverage chart and the class-balance charts.
    assert len(outputs_of(nb, "image/png")) >= 3
    html = "\n".join(outputs_of(nb, "text/html"))
    assert "samples" in html and "relevance" in html
    printed = "\n".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )
    assert f"{root}: 24 rows, 24 usable samples" in printed
