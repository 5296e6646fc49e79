"""One command for a GPU machine: ``python -m ssl_mt.bench.gpu_check`` (``make gpu-check``).

Runs short real runs of the apps on one CUDA GPU, each as its own process with a timeout,
and prints one table: per row what ran, ok / FAILED with the one-line reason, its time
against its budget, and its figures. A failing row does not stop the others; the exit code
is 1 when any row failed. Without CUDA it says so in one line and exits 0.

Needs no ``make install``: the apps run as ``python -m ssl_mt.<app>`` with this checkout
first on ``PYTHONPATH``. Rows, in order (budget in seconds; 460 in all, so the whole check,
start-up included, stays within 8 minutes):

============  ======  =====================================================================
row           budget  runs
============  ======  =====================================================================
data              25  ``python -m ssl_mt.data generate``: 384 images of 192 px, temp folder
pretrain          70  ``python -m ssl_mt.pretrain experiment=quick trainer=gpu``, bf16-mixed,
                      efficientnet_b0, 128 px x 2 epochs then 192 px x 1: time, final loss
finetune          70  ``python -m ssl_mt.finetune``, the same settings: time, final losses
predict           30  ``python -m ssl_mt.predict`` of finetune's last.ckpt on 8 images, GPU
compile_ft       110  finetune with ``compile=true`` (test_efficientnet, 64 px x 2 epochs
                      then 96 px x 2): graphs compiled per stage, none after a stage's
                      first epoch, no graph break, no recompile-limit hit
compile_ssl      110  the same for pretrain
bench             45  ``python -m ssl_mt.bench --device cuda``: ceiling, simclr and mt rows,
                      efficientnet_b0 at 224 px, batch 64: img/s and the ratio to the ceiling
memory             -  peak GPU memory per stage of the four training rows (their
                      ``sys/gpu_peak_mb``, :class:`~ssl_mt.callbacks.memory.MemoryMonitor`)
============  ======  =====================================================================

Graphs are counted by :class:`~ssl_mt.callbacks.compile_graphs.CompileGraphs` (dynamo's
``unique_graphs``, the count ``tests/models/test_compile_graphs.py`` checks), added to the
run's callbacks by an override. ``--keep DIR`` keeps the data, runs and logs in ``DIR``
(else a temporary folder, removed at the end); the last lines of a failed row's log are
printed under the table either way.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ssl_mt.bench.checks import (
    Check,
    CheckFailed,
    exit_code,
    format_checks,
    log_tails,
    run_checks,
    run_command,
)

TOTAL_BUDGET_S = 460.0
REPO = Path(__file__).resolve().parents[2]
CPU_LINE = "gpu-check: no CUDA GPU here (torch.cuda.is_available() is False); nothing to check."
GRAPHS_CALLBACK = "ssl_mt.callbacks.compile_graphs.CompileGraphs"
MIB_PER_GIB = 1024.0


@dataclass(frozen=True)
class Stage:
    """One stage of a progressive schedule."""

    size: int
    epochs: int
    batch_size: int


@dataclass(frozen=True)
class Plan:
    """What the rows run, sized for one H100/H200 (the defaults) within their budgets.

    Attributes:
        workdir: Where the data, the runs and the logs go.
        python: The interpreter the commands run with.
        trainer: The trainer overrides of the training rows.
        backbone: The backbone of the pretrain and finetune rows.
        stages: Their schedule (two stages: the switch of resolution).
        compile_backbone: The backbone of the compile rows (compiling is the cost).
        compile_stages: Their schedule: two epochs per stage, so a recompile within a stage
            shows up.
        images: Images of the generated dataset.
        image_size: Their side in pixels.
        workers: DataLoader workers of the training rows.
        predict_images: Images ``predict`` runs on.
        predict_accelerator: Its ``--accelerator``.
        bench_args: The options of the bench row, after ``python -m ssl_mt.bench``.
        budgets: Seconds per row.
    """

    workdir: Path
    python: str = sys.executable
    trainer: tuple[str, ...] = ("trainer=gpu", "trainer.precision=bf16-mixed")
    backbone: str = "efficientnet_b0"
    stages: tuple[Stage, ...] = (Stage(128, 2, 32), Stage(192, 1, 32))
    compile_backbone: str = "test_efficientnet"
    compile_stages: tuple[Stage, ...] = (Stage(64, 2, 16), Stage(96, 2, 16))
    images: int = 384
    image_size: int = 192
    workers: int = 6
    predict_images: int = 8
    predict_accelerator: str = "gpu"
    bench_args: tuple[str, ...] = (
        "--device", "cuda", "--backbone", "efficientnet_b0", "--sizes", "224",
        "--batch-sizes", "64", "--steps", "10", "--warmup", "3", "--only", "ceiling,simclr,mt",
        "--synthetic-n", "64", "--workers", "2", "--quiet",
    )  # fmt: skip
    budgets: dict[str, float] = field(
        default_factory=lambda: {
            "data": 25.0,
            "pretrain": 70.0,
            "finetune": 70.0,
            "predict": 30.0,
            "compile_ft": 110.0,
            "compile_ssl": 110.0,
            "bench": 45.0,
        }
    )

    @property
    def data(self) -> Path:
        return self.workdir / "data"

    def run_dir(self, row: str) -> Path:
        return self.workdir / "runs" / row

    def log(self, row: str) -> Path:
        return self.workdir / "logs" / f"{row}.log"


# The training rows: row name -> (app, compiled).
FIT_ROWS = {
    "pretrain": ("pretrain", False),
    "finetune": ("finetune", False),
    "compile_ft": ("finetune", True),
    "compile_ssl": ("pretrain", True),
}


def stages_override(stages: Sequence[Stage]) -> str:
    """``schedule.stages`` as a Hydra override value."""
    items = ",".join(
        f"{{size:{s.size},epochs:{s.epochs},batch_size:{s.batch_size}}}" for s in stages
    )
    return f"[{items}]"


def fit_stages(plan: Plan, row: str) -> tuple[Stage, ...]:
    return plan.compile_stages if FIT_ROWS[row][1] else plan.stages


def fit_overrides(plan: Plan, row: str) -> list[str]:
    """The Hydra overrides of a training row."""
    app, compiled = FIT_ROWS[row]
    stages = fit_stages(plan, row)
    sizes = ",".join(str(s.size) for s in stages)
    overrides = [
        "experiment=quick",
        *plan.trainer,
        f"backbone={plan.compile_backbone if compiled else plan.backbone}",
        "channels_last=true",
        f"compile={'true' if compiled else 'false'}",
        f"data.root={plan.data}",
        f"data.num_workers={plan.workers}",
        f"schedule.stages={stages_override(stages)}",
        f"schedule.eval_sizes=[{sizes}]",
        "ckpt_path=null",
        f"hydra.run.dir={plan.run_dir(row)}",
        "++trainer.enable_progress_bar=false",
    ]
    if app == "finetune":
        overrides += ["test_after_fit=false", "eval_records=false"]
    if compiled:
        overrides.append(f"+callbacks.compile_graphs._target_={GRAPHS_CALLBACK}")
    return overrides


def fit_command(plan: Plan, row: str) -> list[str]:
    return [plan.python, "-m", f"ssl_mt.{FIT_ROWS[row][0]}", *fit_overrides(plan, row)]


def data_command(plan: Plan) -> list[str]:
    return [
        plan.python, "-m", "ssl_mt.data", "generate", "--out", str(plan.data),
        "--n", str(plan.images), "--size", str(plan.image_size),
    ]  # fmt: skip


def bench_command(plan: Plan) -> list[str]:
    return [plan.python, "-m", "ssl_mt.bench", *plan.bench_args, "--out", str(bench_json(plan))]


def bench_json(plan: Plan) -> Path:
    return plan.workdir / "bench.json"


def checkpoint(plan: Plan) -> Path:
    """The fine-tuned checkpoint ``predict`` runs."""
    return plan.run_dir("finetune") / "checkpoints" / "last.ckpt"


def predict_command(plan: Plan) -> list[str]:
    return [
        plan.python, "-m", "ssl_mt.predict", str(checkpoint(plan)),
        str(plan.workdir / "predict_in"), "--out", str(plan.workdir / "predict"),
        "--accelerator", plan.predict_accelerator, "--workers", "2",
    ]  # fmt: skip


def subprocess_env() -> dict[str, str]:
    """This checkout first on ``PYTHONPATH`` (no install needed), output unbuffered."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env["HYDRA_FULL_ERROR"] = "1"
    return env


# ---- reading what the runs wrote ----


def epoch_metrics(path: Path) -> list[dict[str, float]]:
    """``metrics.csv`` per epoch: every non-empty value logged in it (the last one wins)."""
    if not path.is_file():
        raise CheckFailed(f"no metrics file {path}")
    epochs: dict[int, dict[str, float]] = {}
    with path.open(newline="") as f:
        for record in csv.DictReader(f):
            if not record.get("epoch"):
                continue
            values = epochs.setdefault(int(float(record["epoch"])), {})
            values.update({k: float(v) for k, v in record.items() if k != "epoch" and v})
    return [epochs.get(e, {}) for e in range(max(epochs) + 1)] if epochs else []


def stage_epochs(stages: Sequence[Stage]) -> list[range]:
    """The epochs of each stage."""
    ranges, start = [], 0
    for s in stages:
        ranges.append(range(start, start + s.epochs))
        start += s.epochs
    return ranges


def check_epochs(metrics: list[dict[str, float]], stages: Sequence[Stage], path: Path) -> None:
    expected = sum(s.epochs for s in stages)
    if len(metrics) != expected:
        raise CheckFailed(f"{path}: {len(metrics)} epochs logged, expected {expected}")


def final(metrics: list[dict[str, float]], key: str, path: Path) -> float:
    """The last epoch's ``key``; fails when it is missing or not finite."""
    value = metrics[-1].get(key) if metrics else None
    if value is None:
        raise CheckFailed(f"{path}: no {key} in the last epoch")
    if not math.isfinite(value):
        raise CheckFailed(f"{path}: {key} = {value} in the last epoch")
    return value


def stage_peaks_gib(metrics: list[dict[str, float]], stages: Sequence[Stage]) -> list[float]:
    """Peak GPU memory of each stage (the largest ``sys/gpu_peak_mb`` of its epochs), GiB."""
    peaks = []
    for number, epochs in enumerate(stage_epochs(stages), 1):
        values = [metrics[e]["sys/gpu_peak_mb"] for e in epochs if "sys/gpu_peak_mb" in metrics[e]]
        if not values:
            raise CheckFailed(f"no sys/gpu_peak_mb in stage {number} (the memory callback)")
        peaks.append(max(values) / MIB_PER_GIB)
    return peaks


def fit_time(metrics: list[dict[str, float]]) -> str:
    seconds = [m["train/epoch_time_s"] for m in metrics if "train/epoch_time_s" in m]
    return f", {sum(seconds):.0f} s in epochs" if seconds else ""


def loss_figures(app: str, metrics: list[dict[str, float]], stages: Sequence[Stage], path: Path):
    """The final losses of a run, as figures."""
    if app == "pretrain":
        return f"train/loss {final(metrics, 'train/loss', path):.4f}"
    val = f"val/{stages[-1].size}/global/loss"
    return (
        f"train/total_loss {final(metrics, 'train/total_loss', path):.4f}, "
        f"{val} {final(metrics, val, path):.4f}"
    )


def graph_figures(metrics: list[dict[str, float]], stages: Sequence[Stage], path: Path) -> str:
    """Graphs compiled per stage; fails on graphs added after a stage's first epoch, graph
    breaks or recompile-limit hits."""
    totals = [m.get("compile/graphs") for m in metrics]
    if any(t is None for t in totals):
        raise CheckFailed(f"{path}: compile/graphs missing (the CompileGraphs callback)")
    added = [int(t - (totals[e - 1] if e else 0)) for e, t in enumerate(totals)]
    per_stage = [sum(added[e] for e in epochs) for epochs in stage_epochs(stages)]
    figures = f"graphs per stage {'/'.join(map(str, per_stage))}"
    for number, epochs in enumerate(stage_epochs(stages), 1):
        if added[epochs[0]] <= 0:
            raise CheckFailed(f"{figures}: no new training graph in stage {number}")
        late = {e: added[e] for e in epochs[1:] if added[e]}
        if late:
            raise CheckFailed(f"{figures}: stage {number} recompiled in epoch(s) {late}")
    breaks = int(metrics[-1].get("compile/graph_breaks", 0))
    hits = int(metrics[-1].get("compile/limit_hits", 0))
    if breaks:
        raise CheckFailed(f"{figures}: {breaks} graph break(s)")
    if hits:
        raise CheckFailed(f"{figures}: {hits} frame(s) hit dynamo's recompile limit (eager)")
    return f"{figures}, none within a stage, 0 breaks"


def bench_figures(path: Path, rows: Sequence[str]) -> str:
    """img/s and the ratio to the ceiling of each bench row in the bench's JSON output."""
    if not path.is_file():
        raise CheckFailed(f"no bench output {path}")
    measured = {r["row"]: r for r in json.loads(path.read_text())["rows"]}
    missing = [r for r in rows if r not in measured]
    if missing:
        raise CheckFailed(f"{path}: no bench row(s) {missing}")
    parts = []
    for name in rows:
        r = measured[name]
        if not r["images_per_s"] > 0:
            raise CheckFailed(f"{path}: {name} measured {r['images_per_s']} img/s")
        ratio = f" {r['ratio']:.2f}x" if r.get("ratio") is not None and name != "ceiling" else ""
        parts.append(f"{name} {r['images_per_s']:.0f} img/s{ratio}")
    size = measured[rows[0]]["size"]
    return f"{size} px: " + ", ".join(parts)


# ---- the rows ----


@dataclass
class Shared:
    """What rows hand to later rows: peak GiB per stage of each training row."""

    peaks: dict[str, list[float]] = field(default_factory=dict)


def data_row(plan: Plan) -> Callable[[float], str]:
    def run(timeout: float) -> str:
        run_command(data_command(plan), timeout, plan.log("data"), env=subprocess_env())
        images = sorted((plan.data / "images").glob("*"))
        if not (plan.data / "labels.csv").is_file() or not images:
            raise CheckFailed(f"{plan.data}: no labels.csv or no images written")
        return f"{len(images)} images of {plan.image_size} px in {plan.data}"

    return run


def fit_row(plan: Plan, row: str, shared: Shared) -> Callable[[float], str]:
    app, compiled = FIT_ROWS[row]
    stages = fit_stages(plan, row)

    def run(timeout: float) -> str:
        command = fit_command(plan, row)
        run_command(command, timeout, plan.log(row), cwd=plan.workdir, env=subprocess_env())
        path = plan.run_dir(row) / "metrics.csv"
        metrics = epoch_metrics(path)
        check_epochs(metrics, stages, path)
        with contextlib.suppress(CheckFailed):  # the memory row reports it
            shared.peaks[row] = stage_peaks_gib(metrics, stages)
        figures = (
            graph_figures(metrics, stages, path)
            if compiled
            else loss_figures(app, metrics, stages, path)
        )
        return f"{len(metrics)} epochs{fit_time(metrics)}; {figures}"

    return run


def memory_row(plan: Plan, shared: Shared) -> Callable[[float], str]:
    def run(timeout: float) -> str:
        parts = [
            f"{row} {'/'.join(f'{gib:.2f}' for gib in shared.peaks[row])}"
            for row in FIT_ROWS
            if row in shared.peaks
        ]
        missing = [row for row in FIT_ROWS if row not in shared.peaks]
        text = "peak GiB per stage: " + ", ".join(parts) if parts else "no peaks"
        if missing:
            raise CheckFailed(
                f"{text}; none from {', '.join(missing)} (failed, or no sys/gpu_peak_mb)"
            )
        return text

    return run


def bench_row(plan: Plan) -> Callable[[float], str]:
    rows = plan.bench_args[plan.bench_args.index("--only") + 1].split(",")

    def run(timeout: float) -> str:
        log = plan.log("bench")
        run_command(bench_command(plan), timeout, log, cwd=plan.workdir, env=subprocess_env())
        return bench_figures(bench_json(plan), rows)

    return run


def predict_row(plan: Plan) -> Callable[[float], str]:
    def run(timeout: float) -> str:
        if not checkpoint(plan).is_file():
            raise CheckFailed(f"no fine-tuned checkpoint {checkpoint(plan)} (the finetune row)")
        inputs = plan.workdir / "predict_in"
        inputs.mkdir(parents=True, exist_ok=True)
        for image in sorted((plan.data / "images").glob("*"))[: plan.predict_images]:
            shutil.copy(image, inputs / image.name)
        log = plan.log("predict")
        run_command(predict_command(plan), timeout, log, cwd=plan.workdir, env=subprocess_env())
        table = plan.workdir / "predict" / "predictions.csv"
        if not table.is_file():
            raise CheckFailed(f"no {table}")
        with table.open(newline="") as f:
            rows = sum(1 for _ in csv.DictReader(f))
        written = len(list(inputs.iterdir()))
        if rows != written:
            raise CheckFailed(f"{table}: {rows} rows for {written} images")
        return f"{rows} images, {table.name} + masks"

    return run


def checks(plan: Plan) -> list[Check]:
    """The rows, in the order they run."""
    shared = Shared()
    b = plan.budgets
    size = "->".join(str(s.size) for s in plan.stages)
    compile_size = "->".join(str(s.size) for s in plan.compile_stages)
    return [
        Check("data", f"generate {plan.images} images", b["data"], data_row(plan)),
        Check(
            "pretrain",
            f"pretrain {plan.backbone} bf16 {size}px",
            b["pretrain"],
            fit_row(plan, "pretrain", shared),
        ),
        Check(
            "finetune",
            f"finetune {plan.backbone} bf16 {size}px",
            b["finetune"],
            fit_row(plan, "finetune", shared),
        ),
        Check("predict", "predict last.ckpt on the GPU", b["predict"], predict_row(plan)),
        Check(
            "compile_ft",
            f"finetune compile=true {compile_size}px",
            b["compile_ft"],
            fit_row(plan, "compile_ft", shared),
        ),
        Check(
            "compile_ssl",
            f"pretrain compile=true {compile_size}px",
            b["compile_ssl"],
            fit_row(plan, "compile_ssl", shared),
        ),
        Check("bench", "bench vs ceiling, cuda", b["bench"], bench_row(plan)),
        Check("memory", "peak GPU memory per stage", 0.0, memory_row(plan, shared)),
    ]


def title() -> str:
    import torch

    name = torch.cuda.get_device_name(0)
    return f"gpu-check on {name}: torch {torch.__version__}, budget {TOTAL_BUDGET_S:.0f} s"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ssl_mt.bench.gpu_check",
        description="Short real runs of the apps on one CUDA GPU, in one table (<= 8 min).",
    )
    parser.add_argument("--keep", type=Path, help="keep data, runs and logs in this folder")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON to this file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the rows and prints the table; returns the exit code."""
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(CPU_LINE)
        return 0
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="ssl_mt_gpu_check_"))
    workdir.mkdir(parents=True, exist_ok=True)
    plan = Plan(workdir=workdir.resolve())
    try:
        results = run_checks(
            checks(plan), TOTAL_BUDGET_S, progress=lambda line: print(line, file=sys.stderr)
        )
        print(format_checks(results, title=title()))
        tails = log_tails(results)
        if tails:
            print("\n" + tails)
        if args.out:
            rows = [{**r.__dict__, "log": str(r.log) if r.log else None} for r in results]
            args.out.write_text(json.dumps(rows, indent=2) + "\n")
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return exit_code(results)


if __name__ == "__main__":
    sys.exit(main())
