"""Label-efficiency study: every arm × label fraction × seed as a fine-tuning run.

    python -m ssl_mt.study --out STUDY_DIR [--arms mt mt_ssl] [--fractions 0.05 0.25 1]
        [--seeds 0 1 2] [--weights PRETRAIN_RUN/backbone] [-- HYDRA OVERRIDES]

Each run is ``python -m ssl_mt.finetune`` (its own process and Hydra run folder) in
``STUDY_DIR/<arm>/frac<PCT>/seed<S>/`` (PCT: the label fraction in percent, 3 digits), the
layout ``python -m ssl_mt.compare study STUDY_DIR`` reads. The overrides after ``--`` go
to every run (e.g. ``experiment=quick data.root=DIR``); an arm only adds its backbone
initialisation, so arms differ in nothing else:

- ``mt``: a random backbone;
- ``mt_ssl``: ``backbone.weights=--weights`` (one pretraining shared by all its runs);
- ``mt_imagenet``: timm's ImageNet weights (``backbone.pretrained=true``), or with
  ``--imagenet-file`` a local copy of them through timm's ``pretrained_cfg_overlay``;
- ``mt_ssl_imagenet``: ``backbone.weights=--ssl-imagenet-weights``, a pretraining started
  from ImageNet weights (``experiment=seed_b4_imagenet``).

The labeled subset depends on the fraction and ``data.label_seed`` only, never on the run
seed, so every arm and seed at one fraction sees the same labels. Re-running the command
resumes unfinished runs (``ckpt_path=auto``) and skips finished ones.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ARMS = ("mt", "mt_ssl", "mt_imagenet", "mt_ssl_imagenet")
DONE_FILE = "study_run.done"


def fraction_dir(fraction: float) -> str:
    """``frac005`` for 0.05, ``frac100`` for 1.0."""
    percent = round(100 * fraction)
    if not 0 < fraction <= 1 or abs(100 * fraction - percent) > 1e-9:
        raise ValueError(f"label fraction {fraction}: need a whole percent in (0, 1]")
    return f"frac{percent:03d}"


def arm_overrides(
    arm: str,
    weights: Path | None,
    imagenet_file: Path | None,
    ssl_imagenet_weights: Path | None = None,
) -> list[str]:
    """The overrides that make ``arm``: its name and its backbone initialisation."""
    if arm == "mt":
        return ["experiment_name=mt"]
    if arm in ("mt_ssl", "mt_ssl_imagenet"):
        path, flag = (
            (weights, "--weights")
            if arm == "mt_ssl"
            else (ssl_imagenet_weights, "--ssl-imagenet-weights")
        )
        if path is None or not path.exists():
            raise ValueError(f"arm {arm} needs {flag} PRETRAIN_RUN/backbone (got {path})")
        return [
            f"experiment_name={arm}",
            f"backbone.weights={path}",
            "require_backbone_weights=true",
        ]
    if arm == "mt_imagenet":
        overrides = ["experiment_name=mt_imagenet", "backbone.pretrained=true"]
        if imagenet_file is not None:
            overrides.append(f"+backbone.pretrained_cfg_overlay={{file:{imagenet_file}}}")
        return overrides
    raise ValueError(f"unknown arm {arm!r}; arms: {list(ARMS)}")


def plan(
    out: Path,
    arms: Sequence[str],
    fractions: Sequence[float],
    seeds: Sequence[int],
    weights: Path | None,
    imagenet_file: Path | None,
    overrides: Sequence[str],
    ssl_imagenet_weights: Path | None = None,
) -> list[tuple[Path, list[str]]]:
    """(run folder, finetune overrides) of every run, smallest fraction first."""
    runs = []
    for fraction in sorted(fractions):
        for seed in seeds:
            for arm in arms:
                run_dir = out / arm / fraction_dir(fraction) / f"seed{seed}"
                runs.append(
                    (
                        run_dir,
                        [
                            *overrides,
                            *arm_overrides(arm, weights, imagenet_file, ssl_imagenet_weights),
                            f"seed={seed}",
                            f"data.label_fraction={fraction}",
                            f"hydra.run.dir={run_dir}",
                        ],
                    )
                )
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        prog="python -m ssl_mt.study", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="study folder")
    parser.add_argument("--arms", nargs="+", default=["mt", "mt_ssl"], choices=ARMS)
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.05, 0.25, 1.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--weights", type=Path, help="SSL export folder for the mt_ssl arm")
    parser.add_argument("--imagenet-file", type=Path, help="local timm weights (mt_imagenet)")
    parser.add_argument(
        "--ssl-imagenet-weights", type=Path, help="export of SSL from ImageNet (mt_ssl_imagenet)"
    )
    args = parser.parse_args(own)
    try:
        runs = plan(
            args.out,
            args.arms,
            args.fractions,
            args.seeds,
            args.weights,
            args.imagenet_file,
            overrides,
            args.ssl_imagenet_weights,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    for i, (run_dir, run_overrides) in enumerate(runs, 1):
        if (run_dir / DONE_FILE).is_file():
            print(f"[{i}/{len(runs)}] {run_dir}: done before, skipped", flush=True)
            continue
        print(f"[{i}/{len(runs)}] {run_dir}", flush=True)
        command = [sys.executable, "-m", "ssl_mt.finetune", *run_overrides]
        result = subprocess.run(command, check=False)
        if result.returncode != 0:
            print(f"error: run {run_dir} failed ({result.returncode}): {command}", file=sys.stderr)
            return result.returncode
        (run_dir / DONE_FILE).write_text(" ".join(command) + "\n")
    print(f"study: {len(runs)} runs in {args.out} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
