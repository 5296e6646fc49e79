"""``python -m ssl_mt.compare``: compare arms of fine-tuning runs, or draw a label-efficiency study.

::

    python -m ssl_mt.compare RUN_DIR [RUN_DIR ...] --out DIR [--names A B ...]
    python -m ssl_mt.compare --arm MT=runs/a,runs/b --arm MT+SSL=runs/c,runs/d --out DIR
    python -m ssl_mt.compare study STUDY_DIR --out DIR [--reference ARM]

Each RUN_DIR is one arm (a Hydra multirun folder: an arm of all its runs); ``--arm`` groups
runs (seeds) into a named arm. The first arm is the reference of every difference.
Bootstrap and records settings default to ``conf/compare.yaml``.

Exit codes: 0 report written; 2 the runs cannot be compared (the message names the folder or
file), without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ssl_mt.compare.arms import load_arms, parse_arm
from ssl_mt.compare.claims_report import claims_summary
from ssl_mt.compare.multiplicity import METHODS
from ssl_mt.compare.report import (
    load_choice,
    study_summary_text,
    verdict_text,
    write_comparison,
    write_study,
)
from ssl_mt.compare.run import EXIT_ERROR, CompareError, read_config
from ssl_mt.compare.selection import CHECKPOINT_CHOICES, SPLIT_CHOICES, resolve_choice
from ssl_mt.compare.study_layout import load_study
from ssl_mt.shutdown import freeze_heap_at_exit

STUDY = "study"


def _settings_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("statistics (defaults: conf/compare.yaml)")
    group.add_argument(
        "--checkpoint",
        choices=CHECKPOINT_CHOICES,
        help="records of which checkpoint (auto: best on test when there is a test split, "
        "else last; best is never judged on the split that chose it)",
    )
    group.add_argument("--split", choices=SPLIT_CHOICES, help="records of which split")
    group.add_argument(
        "--multiplicity",
        choices=sorted(METHODS),
        help="adjustment of the family's p-values (statsmodels multipletests)",
    )
    group.add_argument(
        "--reach",
        type=float,
        help="'faster': epochs to reach REACH x the reference's final val loss",
    )
    group.add_argument("--bootstrap", type=int, metavar="N", help="bootstrap replicates")
    group.add_argument("--seed", type=int, help="seed of the bootstrap")
    group.add_argument("--confidence", type=float, help="coverage of the intervals, e.g. 0.95")


def _choice(args: argparse.Namespace):
    return load_choice(
        {
            "checkpoint": args.checkpoint,
            "split": args.split,
            "iterations": args.bootstrap,
            "seed": args.seed,
            "confidence": args.confidence,
            "multiplicity": args.multiplicity,
            "reach": args.reach,
        }
    )


def _compare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ssl_mt.compare",
        description=(
            "Compare arms of fine-tuning runs: per-task differences with intervals and a "
            "verdict (from the runs' per-image evaluation records), loss curves per task and "
            "global with bands over seeds (resolution switches marked), final/best metrics "
            "and the jump at each resolution switch. Differences are each arm minus the "
            "first. `python -m ssl_mt.compare study STUDY_DIR --out DIR` draws a "
            "label-efficiency study."
        ),
    )
    parser.add_argument(
        "runs",
        nargs="*",
        type=Path,
        metavar="RUN_DIR",
        help="run (or multirun) folders, one arm each",
    )
    parser.add_argument(
        "--arm",
        action="append",
        default=[],
        metavar="NAME=DIR[,DIR...]",
        help="an arm of several runs (seeds); repeat for each arm",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the report")
    parser.add_argument(
        "--names", nargs="+", default=None, metavar="NAME", help="one name per RUN_DIR"
    )
    parser.add_argument(
        "--linear", action="store_true", help="linear loss axis (default: logarithmic)"
    )
    _settings_arguments(parser)
    return parser


def _study_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ssl_mt.compare study",
        description=(
            "Label efficiency: each task's main metric and loss against the label fraction, "
            "one line per arm with intervals over seeds and images, from runs laid out as "
            "STUDY_DIR/<arm>/frac<PCT>/seed<S>/ (PCT: label fraction in percent, 3 digits)."
        ),
    )
    parser.add_argument("study", type=Path, metavar="STUDY_DIR")
    parser.add_argument("--out", type=Path, required=True, help="folder for study.md/png/csv")
    parser.add_argument(
        "--reference",
        default=None,
        help="the arm the others are compared with (default: mt when present, else the first by name)",
    )
    _settings_arguments(parser)
    return parser


def _arm_specs(args: argparse.Namespace) -> list:
    if args.runs and args.arm:
        raise CompareError("give either RUN_DIRs (one arm each) or --arm NAME=DIRS, not both")
    if args.names is not None and len(args.names) != len(args.runs):
        raise CompareError(
            f"{len(args.names)} name(s) for {len(args.runs)} run(s): give one name per run"
        )
    if args.arm:
        return [parse_arm(spec) for spec in args.arm]
    names = args.names or [None] * len(args.runs)
    return [(name, [path]) for name, path in zip(names, args.runs, strict=True)]


def run_compare(argv: Sequence[str]) -> int:
    args = _compare_parser().parse_args(argv)
    try:
        choice = _choice(args)
        arms = load_arms(_arm_specs(args))
        choice = resolve_choice(choice, [(r.path, r.config) for arm in arms for r in arm.runs])
        paths, comparisons = write_comparison(arms, args.out, logy=not args.linear, choice=choice)
    except (CompareError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    if comparisons is not None and not comparisons.empty:
        print(verdict_text(comparisons, choice, arms))
        print()
        summary = claims_summary(comparisons.attrs.get("claims", pd.DataFrame()))
        if summary:
            print(summary)
            print()
    elif len(arms) > 1:
        print(
            "no verdict: some runs have no per-image evaluation records "
            f"(eval/{choice.checkpoint}/{choice.split}_<size>.csv.gz); see the report"
        )
    print(f"report: {paths['report']}")
    for key, path in paths.items():
        if key != "report":
            print(f"  {key}: {path}")
    return 0


def run_study(argv: Sequence[str]) -> int:
    args = _study_parser().parse_args(argv)
    try:
        choice = _choice(args)
        cells = load_study(args.study)
        choice = resolve_choice(choice, [(run, read_config(run)) for c in cells for run in c.runs])
        paths, table = write_study(cells, args.out, choice, args.reference)
    except (CompareError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    print(study_summary_text(table, choice).removeprefix("## "))
    print()
    summary = claims_summary(table.attrs.get("claims", pd.DataFrame()))
    if summary:
        print(summary)
        print()
    print(f"study: {paths['report']}")
    print(f"  figure: {paths['figure']}")
    print(f"  table: {paths['table']}")
    print(f"  claims: {paths['claims']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == STUDY:
        return run_study(argv[1:])
    return run_compare(argv)


if __name__ == "__main__":
    freeze_heap_at_exit()
    sys.exit(main())
