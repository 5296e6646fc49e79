"""``python -m ssl_mt.bench.gpu_check`` on the CPU: the one line and exit 0, the row runner
and the table with fake rows, the figures read from what the runs write, and every command
a row runs composed or parsed here, so a typo in an override fails without a GPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from ssl_mt import predict
from ssl_mt.bench import gpu_check as gc
from ssl_mt.bench import parse_args, settings_from_args
from ssl_mt.bench.checks import (
    Check,
    CheckFailed,
    exit_code,
    format_checks,
    last_error_line,
    log_tails,
    run_checks,
    run_command,
)
from ssl_mt.callbacks.compile_graphs import CompileGraphs, dynamo_totals
from ssl_mt.config import check_group_keys, check_top_level_keys, check_types, compose
from ssl_mt.data.__main__ import _parser as data_parser

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def plan(tmp_path: Path) -> gc.Plan:
    return gc.Plan(workdir=tmp_path / "work")


# ---- the CPU path ----


def test_cpu_machine_prints_one_line_and_exits_0(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gc.main(["--keep", str(tmp_path / "kept")]) == 0
    assert capsys.readouterr().out == gc.CPU_LINE + "\n"
    assert not (tmp_path / "kept").exists()  # nothing run, nothing written


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_gpu_check_exits_0_without_a_gpu():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CPU path even on a GPU machine
    result = subprocess.run(
        ["make", "-s", "gpu-check"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == gc.CPU_LINE


def test_main_prints_the_table_and_exits_1_when_a_row_failed(monkeypatch, capsys, tmp_path):
    def fake_checks(plan: gc.Plan) -> list[Check]:
        def logged(timeout: float) -> str:
            log = plan.log("broken")
            log.parent.mkdir(parents=True)
            log.write_text("Traceback\nKeyError: 'schedule.stagez'\n")
            raise CheckFailed("exit 1: KeyError: 'schedule.stagez'", log)

        return [Check("fine", "a", 10, lambda t: "42 img/s"), Check("broken", "b", 10, logged)]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gc, "checks", fake_checks)
    monkeypatch.setattr(gc, "title", lambda: "gpu-check on a fake GPU")
    out = tmp_path / "rows.json"
    assert gc.main(["--out", str(out)]) == 1
    printed = capsys.readouterr().out
    assert printed.startswith("gpu-check on a fake GPU")
    assert "42 img/s" in printed and "FAILED" in printed and "1/2 rows ok, 1 FAILED" in printed
    assert "--- broken: last lines of" in printed and "Traceback" in printed
    rows = json.loads(out.read_text())
    assert [(r["name"], r["ok"]) for r in rows] == [("fine", True), ("broken", False)]
    assert not Path(rows[1]["log"]).exists()  # the temporary folder is removed


# ---- the row runner and the table, with fake rows ----


def failing(reason: str, error: type[Exception] = CheckFailed):
    def run(timeout: float) -> str:
        raise error(reason)

    return run


def test_a_failing_row_is_reported_and_the_others_still_run():
    ran = []

    def ok(name: str):
        def run(timeout: float) -> str:
            ran.append(name)
            return f"{name} figures"

        return run

    results = run_checks(
        [
            Check("first", "one", 10, ok("first")),
            Check("broken", "two", 10, failing("exit 1: bad override")),
            Check("crash", "three", 10, failing("line one\nline two", ValueError)),
            Check("last", "four", 10, ok("last")),
        ],
        total_s=100,
    )
    assert ran == ["first", "last"]
    assert [r.ok for r in results] == [True, False, False, True]
    assert results[1].reason == "exit 1: bad override"
    assert results[2].reason == "ValueError: line two"
    assert exit_code(results) == 1
    table = format_checks(results, title="title")
    lines = table.splitlines()
    assert lines[0] == "title"
    assert "broken" in lines[5] and "FAILED" in lines[5] and "exit 1: bad override" in lines[5]
    assert "first" in lines[4] and " ok " in lines[4] and "first figures" in lines[4]
    assert lines[-1] == "2/4 rows ok, 2 FAILED"


def test_all_rows_ok_exit_0():
    results = run_checks([Check("a", "x", 5, lambda t: "fine")], total_s=10)
    assert exit_code(results) == 0
    assert format_checks(results).splitlines()[-1] == "1/1 rows ok"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_each_row_gets_its_budget_within_what_is_left_of_the_total():
    clock = FakeClock()
    timeouts = []

    def takes(seconds: float):
        def run(timeout: float) -> str:
            timeouts.append(timeout)
            clock.now += seconds
            return ""

        return run

    results = run_checks(
        [
            Check("a", "", 30, takes(30)),
            Check("b", "", 50, takes(38)),  # 32 left of 100 after it
            Check("c", "", 40, takes(30)),  # gets the 32 left, not its 40
            Check("d", "", 10, takes(1)),  # 2 s left: not run
            Check("e", "", 0, takes(0)),  # no command: runs anyway
        ],
        total_s=100,
        clock=clock,
    )
    assert timeouts[:3] == [30, 50, 32]
    assert [r.ok for r in results] == [True, True, True, False, True]
    assert results[3].reason.startswith("not run: the total budget of 100 s is spent")
    assert [r.seconds for r in results] == [30, 38, 30, 0, 0]


def test_run_command_kills_what_runs_past_its_timeout(tmp_path):
    log = tmp_path / "sleep.log"
    with pytest.raises(CheckFailed, match="timed out after 1 s") as caught:
        run_command([sys.executable, "-c", "import time; time.sleep(30)"], 1, log)
    assert caught.value.log == log


def test_run_command_reports_the_error_line_and_the_log_tail(tmp_path):
    log = tmp_path / "fail.log"
    code = "import sys; print('working'); print('ValueError: no key foo'); sys.exit(3)"
    with pytest.raises(CheckFailed, match="exit 3: ValueError: no key foo"):
        run_command([sys.executable, "-c", code], 30, log)
    results = run_checks(
        [Check("cmd", "", 30, lambda t: run_command([sys.executable, "-c", code], t, log))], 60
    )
    assert results[0].log == log
    assert "working" in log_tails(results)
    assert last_error_line("a\nerror: bad\ndone\n") == "error: bad"
    assert last_error_line("a\nlast\n") == "last"


# ---- every command a row runs, composed or parsed on the CPU ----


@pytest.mark.parametrize("row", list(gc.FIT_ROWS))
def test_training_rows_compose(plan, row):
    app, compiled = gc.FIT_ROWS[row]
    command = gc.fit_command(plan, row)
    assert command[:3] == [plan.python, "-m", f"ssl_mt.{app}"]
    cfg = compose(app, command[3:])
    check_top_level_keys(cfg, app)
    check_group_keys(cfg)
    check_types(cfg)
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.compile is compiled
    assert cfg.backbone.name == (plan.compile_backbone if compiled else plan.backbone)
    stages = gc.fit_stages(plan, row)
    assert [(s.size, s.epochs, s.batch_size) for s in cfg.schedule.stages] == [
        (s.size, s.epochs, s.batch_size) for s in stages
    ]
    assert cfg.data.root == str(plan.data)
    if compiled:
        assert isinstance(instantiate(cfg.callbacks.compile_graphs), CompileGraphs)
    assert "memory" in cfg.callbacks  # the peaks the memory row reads


def test_data_command_parses(plan):
    command = gc.data_command(plan)
    args = data_parser().parse_args(command[3:])
    assert (args.command, args.n, args.size, args.out) == (
        "generate",
        plan.images,
        plan.image_size,
        plan.data,
    )


def test_bench_command_parses_and_validates(plan):
    command = gc.bench_command(plan)
    assert command[:3] == [plan.python, "-m", "ssl_mt.bench"]
    args = parse_args(command[3:])
    assert args.device == "cuda" and args.out == str(gc.bench_json(plan))
    args.device = "cpu"  # validated here as on the GPU, but without one
    settings = settings_from_args(args).resolved()
    assert settings.only == ["ceiling", "simclr", "mt"]


def test_predict_command_parses(plan, monkeypatch):
    seen = {}

    def fake_predict(ckpt, inputs, out, **kwargs):
        seen.update(ckpt=ckpt, inputs=inputs, out=out, **kwargs)
        return {"images": 8, "size": 192, "metrics": None}

    monkeypatch.setattr(predict, "predict", fake_predict)
    command = gc.predict_command(plan)
    assert command[:3] == [plan.python, "-m", "ssl_mt.predict"]
    assert predict.main(command[3:]) == 0
    assert seen["ckpt"] == gc.checkpoint(plan) and seen["accelerator"] == "gpu"


def test_the_budgets_fit_in_8_minutes(plan):
    assert set(plan.budgets) == {c.name for c in gc.checks(plan) if c.budget_s > 0}
    assert sum(plan.budgets.values()) <= gc.TOTAL_BUDGET_S <= 8 * 60 - 15


def test_subprocesses_import_this_checkout():
    assert gc.subprocess_env()["PYTHONPATH"].split(os.pathsep)[0] == str(REPO)


# ---- the figures, from what the runs write ----


def write_metrics(path: Path, rows: list[dict[str, float]]) -> Path:
    keys = sorted({k for row in rows for k in row})
    lines = [",".join(keys)] + [",".join(str(row.get(k, "")) for k in keys) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


STAGES = (gc.Stage(64, 2, 16), gc.Stage(96, 2, 16))


def test_graphs_per_stage_and_peaks(tmp_path):
    rows = [
        {"epoch": 0, "step": 5, "train/loss": 4.0},  # a step row, then the epoch's
        {"epoch": 0, "step": 9, "compile/graphs": 5, "sys/gpu_peak_mb": 512},
        {"epoch": 1, "step": 19, "compile/graphs": 5, "sys/gpu_peak_mb": 600},
        {"epoch": 2, "step": 29, "compile/graphs": 7, "sys/gpu_peak_mb": 1024},
        {"epoch": 3, "step": 39, "compile/graphs": 7, "sys/gpu_peak_mb": 900, "train/loss": 3.0},
    ]
    path = write_metrics(tmp_path / "metrics.csv", rows)
    metrics = gc.epoch_metrics(path)
    gc.check_epochs(metrics, STAGES, path)
    assert gc.graph_figures(metrics, STAGES, path).startswith("graphs per stage 5/2,")
    assert gc.stage_peaks_gib(metrics, STAGES) == pytest.approx([600 / 1024, 1.0])
    assert gc.loss_figures("pretrain", metrics, STAGES, path) == "train/loss 3.0000"
    with pytest.raises(CheckFailed, match="3 epochs logged, expected 4"):
        gc.check_epochs(metrics[:3], STAGES, path)


@pytest.mark.parametrize(
    ("graphs", "extra", "match"),
    [
        ([5, 6, 7, 7], {}, r"stage 1 recompiled in epoch\(s\) \{1: 1\}"),
        ([5, 5, 5, 5], {}, "no new training graph in stage 2"),
        ([5, 5, 7, 7], {"compile/graph_breaks": 2}, "2 graph break"),
        ([5, 5, 7, 7], {"compile/limit_hits": 1}, "recompile limit"),
    ],
)
def test_graph_figures_fail_on_recompiles_breaks_and_limit_hits(tmp_path, graphs, extra, match):
    rows = [{"epoch": e, "compile/graphs": g} for e, g in enumerate(graphs)]
    rows[-1].update(extra)
    path = write_metrics(tmp_path / "metrics.csv", rows)
    with pytest.raises(CheckFailed, match=match):
        gc.graph_figures(gc.epoch_metrics(path), STAGES, path)


def test_a_missing_or_nan_loss_fails(tmp_path):
    path = write_metrics(tmp_path / "m.csv", [{"epoch": 0, "train/total_loss": float("nan")}])
    with pytest.raises(CheckFailed, match="train/total_loss = nan"):
        gc.loss_figures("finetune", gc.epoch_metrics(path), STAGES[:1], path)
    with pytest.raises(CheckFailed, match="no metrics file"):
        gc.epoch_metrics(tmp_path / "absent.csv")


def test_bench_figures(tmp_path):
    rows = [
        {"row": "ceiling", "size": 224, "images_per_s": 2000.0, "ratio": None},
        {"row": "simclr", "size": 224, "images_per_s": 1500.0, "ratio": 0.75},
        {"row": "mt", "size": 224, "images_per_s": 1000.0, "ratio": 0.5},
    ]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"meta": {}, "rows": rows}))
    assert gc.bench_figures(path, ["ceiling", "simclr", "mt"]) == (
        "224 px: ceiling 2000 img/s, simclr 1500 img/s 0.75x, mt 1000 img/s 0.50x"
    )
    with pytest.raises(CheckFailed, match=r"no bench row\(s\) \['unet'\]"):
        gc.bench_figures(path, ["ceiling", "unet"])


def test_memory_row_names_the_rows_without_peaks(plan):
    shared = gc.Shared(peaks={"pretrain": [1.0, 2.5], "finetune": [0.5, 0.75]})
    with pytest.raises(CheckFailed, match="none from compile_ft, compile_ssl"):
        gc.memory_row(plan, shared)(0)
    shared.peaks.update(compile_ft=[0.1, 0.2], compile_ssl=[0.3, 0.4])
    assert gc.memory_row(plan, shared)(0).startswith("peak GiB per stage: pretrain 1.00/2.50,")


def test_predict_row_fails_without_the_fine_tuned_checkpoint(plan):
    with pytest.raises(CheckFailed, match="no fine-tuned checkpoint"):
        gc.predict_row(plan)(30)


# ---- the graph counter ----


class LogRecorder:
    def __init__(self) -> None:
        self.logged: dict[str, float] = {}

    def log(self, name: str, value: float, **kwargs) -> None:
        self.logged[name] = value


def test_compile_graphs_logs_dynamo_totals():
    torch._dynamo.reset()
    before = dynamo_totals()["graphs"]
    double = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
    double(torch.ones(2))
    double(torch.ones(3))  # a new shape: a second graph
    double(torch.ones(3))
    callback = CompileGraphs()
    module = LogRecorder()
    callback.on_fit_start(None, module)
    callback.on_train_epoch_end(None, module)
    callback.teardown(None, module, "fit")
    assert module.logged["compile/graphs"] == before + 2
    assert module.logged["compile/limit_hits"] == 0
    torch._dynamo.reset()
