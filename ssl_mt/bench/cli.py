"""Command line of the benchmark (``python -m ssl_mt.bench [options]``): options, run, print."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ssl_mt.bench.measurement import run_bench
from ssl_mt.bench.report import format_table
from ssl_mt.bench.settings import DECODINGS, ONLY_CHOICES, PRECISIONS, BenchSettings


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ssl_mt.bench",
        description="Training throughput of the SimCLR and multi-task steps against the bare "
        "backbone's ceiling, end to end from disk, and of the data pipelines alone.",
        epilog="examples:\n"
        "  python -m ssl_mt.bench                      # quick CPU profile (~1 min)\n"
        "  python -m ssl_mt.bench --device cuda --sizes 224 384 --batch-sizes 128 64 --compile\n"
        "  python -m ssl_mt.bench --only data --sizes 224 384 --workers 1 2 --data DIR\n"
        "  python -m ssl_mt.bench --only data --sizes 224 384 --batch-sizes 4 --camera 16"
        "   # 12 MP JPEGs, full vs reduced\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--backbone", help="timm model (efficientnet_b4 on CUDA, test_efficientnet on CPU)"
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", help="resolutions (224 384 on CUDA, 64 96 on CPU)"
    )
    parser.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        help="per size, or one for all: images per step, SimCLR pairs per step "
        "(128 at <=256 px and 64 above on CUDA; 16 on CPU)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        help="DataLoader workers: data rows at each count, e2e rows at the largest "
        "(min(8, cores-1) on CUDA, 1 on CPU)",
    )
    parser.add_argument(
        "--precision", choices=PRECISIONS, help="bf16-mixed on CUDA, 32-true on CPU"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile(dynamic=False)")
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="NHWC memory format (default: on for CUDA, off for CPU)",
    )
    parser.add_argument("--steps", type=int, help="timed steps per row (20 on CUDA, 4 on CPU)")
    parser.add_argument(
        "--warmup", type=int, help="untimed steps first (5 CUDA, 1 CPU; >=3 compiled)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="time the data rows in N rounds, decodings alternating, times summed (default 1)",
    )
    parser.add_argument("--data", help="dataset root (default: a generated synthetic dataset)")
    parser.add_argument("--synthetic-n", type=int, help="images of the generated dataset")
    parser.add_argument("--synthetic-size", type=int, help="side of the generated images (px)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto")
    parser.add_argument(
        "--only",
        action="append",
        help=f"rows, comma-separated (repeatable): {','.join(ONLY_CHOICES)}",
    )
    parser.add_argument("--optim", default="adamw", choices=("adamw", "sgd", "lars"), help="adamw")
    parser.add_argument(
        "--ssl-augment", default="skin", choices=("skin", "simclr"), help="SSL view preset: skin"
    )
    parser.add_argument(
        "--tasks", default="default", help="conf/tasks option or YAML path: default"
    )
    parser.add_argument("--weighting", default="fixed", help="conf/weighting option: fixed")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="cuDNN autotuning")
    parser.add_argument("--threads", type=int, help="torch threads of the main process")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument(
        "--decoding",
        nargs="+",
        choices=DECODINGS,
        help="JPEG decoding of the data rows, each measured (default: reduced full); "
        "e2e rows use the first",
    )
    parser.add_argument(
        "--camera",
        type=int,
        default=0,
        help="generate N camera-size photos (JPEG + PNG masks) as the dataset (default: off)",
    )
    parser.add_argument(
        "--camera-size",
        type=int,
        nargs=2,
        default=(4000, 3000),
        metavar=("W", "H"),
        help="size of the generated photos (4000 3000: 12 MP)",
    )
    parser.add_argument(
        "--camera-noise",
        type=float,
        default=4.0,
        help="noise of the generated photos in grey levels: sets their JPEG size (4: ~2.2 MB)",
    )
    parser.add_argument("--out", help="also write the results as JSON to this file")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    return BenchSettings(
        backbone=args.backbone,
        sizes=args.sizes,
        batch_sizes=args.batch_sizes,
        workers=args.workers,
        precision=args.precision,
        compile=args.compile,
        channels_last=args.channels_last,
        steps=args.steps,
        warmup=args.warmup,
        rounds=args.rounds,
        data=args.data,
        synthetic_n=args.synthetic_n,
        synthetic_size=args.synthetic_size,
        device=args.device,
        only=args.only,
        optim=args.optim,
        ssl_augment=args.ssl_augment,
        tasks=args.tasks,
        weighting=args.weighting,
        cudnn_benchmark=args.cudnn_benchmark,
        threads=args.threads,
        seed=args.seed,
        progress=not args.quiet,
        decoding=args.decoding,
        camera=args.camera,
        camera_size=tuple(args.camera_size),
        camera_noise=args.camera_noise,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run_bench(settings_from_args(args))
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_table(result, markdown=args.markdown))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return 0
