"""Dataset command line: ``python -m ssl_mt.data {generate,check,preview,prepare} ...``.

Exit codes: 0 success, 1 ``check`` found problems, 2 the command could not run (missing
files, unusable manifest, bad arguments); errors are one paragraph, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from ssl_mt.config import load_group, load_tasks_config
from ssl_mt.data.image_io import BadSampleError
from ssl_mt.data.manifest import ManifestError
from ssl_mt.shutdown import freeze_heap_at_exit
from ssl_mt.tasks import TaskConfigError, TaskSpec, parse_tasks

EXIT_PROBLEMS = 1
EXIT_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one subcommand; returns the process exit code."""
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except (ManifestError, FileNotFoundError, BadSampleError, TaskConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ssl_mt.data", description="Generate, check, preview and resize datasets."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="write a synthetic dataset")
    generate.add_argument("--out", type=Path, required=True, help="dataset root to write")
    generate.add_argument("--n", type=int, required=True, help="number of images")
    generate.add_argument("--size", type=int, default=256, help="image side in pixels")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--irrelevant-fraction", type=float, default=0.15)
    generate.add_argument("--unlabeled-fraction", type=float, default=0.2)
    generate.add_argument("--val-fraction", type=float, default=0.15)
    generate.add_argument(
        "--test-fraction",
        type=float,
        default=0.15,
        help="share of images in the test split: where a checkpoint chosen on val is judged",
    )
    generate.add_argument(
        "--unlabeled-images",
        type=float,
        default=0.0,
        help="share of train images with no label at all (for SSL pretraining only)",
    )
    generate.add_argument("--workers", type=int, default=0, help="processes (0 = all cores)")
    generate.set_defaults(run=_generate)

    check = commands.add_parser(
        "check",
        help="validate labels.csv and every file it names, or every image of a plain folder",
    )
    check.add_argument("root", type=Path, help="dataset root (labels.csv) or image folder")
    check.add_argument(
        "--folder",
        action="store_true",
        help="check ROOT as a plain image folder even when it has a labels.csv",
    )
    check.add_argument(
        "--allow-lossy-masks",
        type=int,
        nargs="?",
        const=128,
        default=None,
        metavar="THRESHOLD",
        help="read JPEG masks thresholded at THRESHOLD (default 128), as training does with "
        "data.allow_lossy_masks=true, instead of reporting them",
    )
    _add_tasks(check)
    check.add_argument("--workers", type=int, default=0, help="threads (0 = all cores)")
    check.add_argument(
        "--train-size",
        type=int,
        default=None,
        help="largest training size in px (default: the apps' default schedules)",
    )
    check.set_defaults(run=_check)

    preview = commands.add_parser("preview", help="draw a grid of samples (or of SSL views)")
    preview.add_argument("root", type=Path, help="dataset root or image folder")
    preview.add_argument("--out", type=Path, required=True, help="PNG to write")
    preview.add_argument("--n", type=int, default=None, help="samples (default 16; 8 views)")
    preview.add_argument("--size", type=int, default=192, help="tile side in pixels")
    preview.add_argument("--seed", type=int, default=0)
    preview.add_argument("--views", action="store_true", help="show two SSL views per image")
    preview.add_argument(
        "--augment", default="simclr", help="augment preset (simclr, skin) or YAML path"
    )
    _add_tasks(preview)
    preview.set_defaults(run=_preview)

    prepare = commands.add_parser("prepare", help="write a downsized copy of a dataset")
    prepare.add_argument("root", type=Path)
    prepare.add_argument("--max-side", type=int, required=True, help="longest image side")
    prepare.add_argument("--out", type=Path, default=None, help="default: ROOT_<max-side>")
    prepare.add_argument(
        "--tasks",
        default=None,
        help="task config whose segmentation columns are masks (default: columns of image paths)",
    )
    prepare.add_argument("--workers", type=int, default=0, help="processes (0 = all cores)")
    prepare.set_defaults(run=_prepare)
    return parser


def _add_tasks(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", default="default", help="conf/tasks option name or a YAML file")


def _tasks(name_or_path: str) -> list[TaskSpec]:
    return parse_tasks(load_tasks_config(name_or_path))


def _generate(args: argparse.Namespace) -> int:
    from ssl_mt.data.synthetic import generate_dataset

    start = time.perf_counter()
    out = generate_dataset(
        args.out,
        n=args.n,
        size=args.size,
        seed=args.seed,
        irrelevant_fraction=args.irrelevant_fraction,
        unlabeled_fraction=args.unlabeled_fraction,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        unlabeled_images=args.unlabeled_images,
        workers=args.workers,
    )
    print(f"wrote {args.n} images to {out} in {time.perf_counter() - start:.1f} s")
    return 0


def _check(args: argparse.Namespace) -> int:
    from ssl_mt.data.check import check_dataset, check_image_folder, format_report
    from ssl_mt.data.manifest import MANIFEST_NAME

    progress = sys.stderr.isatty()
    tasks = _tasks(args.tasks)
    if args.folder or not (args.root / MANIFEST_NAME).is_file():
        report = check_image_folder(args.root, workers=args.workers, progress=progress)
    else:
        report = check_dataset(
            args.root,
            tasks,
            workers=args.workers,
            progress=progress,
            lossy_mask_threshold=args.allow_lossy_masks,
        )
    print(format_report(report))
    if report.samples:
        print("\n".join(_size_lines(args, report.samples, tasks)))
    return 0 if report.ok else EXIT_PROBLEMS


def _size_lines(args: argparse.Namespace, samples, tasks: list[TaskSpec]) -> list[str]:
    """Median image and mask sizes against the training sizes of the apps' defaults."""
    from ssl_mt.config import APPS, compose
    from ssl_mt.data.size_report import format_sizes, summarize_sizes

    configs = [compose(app) for app in APPS]
    train_size = args.train_size or max(
        int(stage.size) for cfg in configs for stage in cfg.schedule.stages
    )
    augments = [cfg.augment for cfg in configs]
    return format_sizes(summarize_sizes(samples, tasks), train_size, augments, args.root)


def _preview(args: argparse.Namespace) -> int:
    from ssl_mt.data.preview import preview_grid, preview_views

    if args.views:
        augment = load_augment_config(args.augment)
        out = preview_views(
            args.root, args.out, augment, n=args.n or 8, size=args.size, seed=args.seed
        )
    else:
        tasks = _tasks(args.tasks)
        out = preview_grid(
            args.root, args.out, tasks, n=args.n or 16, seed=args.seed, size=args.size
        )
    print(f"wrote {out}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from ssl_mt.data.prepare import prepare_dataset

    root = args.root
    out = args.out or root.with_name(f"{root.name}_{args.max_side}")
    tasks = _tasks(args.tasks) if args.tasks else None
    prepare_dataset(root, out, args.max_side, workers=args.workers, tasks=tasks)
    print(f"wrote {out}")
    return 0


def load_augment_config(name_or_path: str) -> DictConfig:
    """A ``conf/augment`` preset by name (``simclr``, ``skin``) or a YAML file laid out as in
    ``conf/`` (``myconf/augment/mine.yaml``)."""
    return load_group("augment", name_or_path)


if __name__ == "__main__":
    freeze_heap_at_exit()
    sys.exit(main())
