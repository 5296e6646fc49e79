"""The comparison report (``report.md`` + PNGs + csv) and the label-efficiency report
(``study.md`` + ``study.png`` + ``study.csv``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from ssl_mt.compare.arms import Arm, as_arms
from ssl_mt.compare.claims import claims_table, study_claims
from ssl_mt.compare.claims_report import claims_markdown
from ssl_mt.compare.curves import plot_train_losses, plot_val_losses
from ssl_mt.compare.differences import (
    arm_records,
    comparison_table,
    format_p,
    study_summary,
    study_table,
    verdict_table,
)
from ssl_mt.compare.differences_plot import plot_differences
from ssl_mt.compare.figures import save_figure
from ssl_mt.compare.keys import JUMP
from ssl_mt.compare.multiplicity import METHODS, UNADJUSTED, check_method
from ssl_mt.compare.run import Run, read_config
from ssl_mt.compare.selection import (
    CHECKPOINT_CHOICES,
    SPLIT_CHOICES,
    RecordsChoice,
    resolve_choice,
)
from ssl_mt.compare.statistics import BootstrapSettings
from ssl_mt.compare.study_layout import StudyCell
from ssl_mt.compare.study_plot import plot_study
from ssl_mt.compare.tables import (
    _metric_column,
    dataframe_to_markdown,
    flat_columns,
    jump_table,
    metric_label,
    plain_markdown,
    summary_table,
)
from ssl_mt.config import CONF_DIR

SETTINGS_FILE = CONF_DIR / "compare.yaml"


def load_choice(overrides: Mapping[str, Any] | None = None) -> RecordsChoice:
    """``conf/compare.yaml`` with ``overrides`` (``iterations``, ``seed``, ``confidence``,
    ``checkpoint``, ``split``, ``multiplicity``, ``min_images``, ``reach``; None values are
    ignored). ``auto`` checkpoint and split are settled per comparison
    (:func:`~ssl_mt.compare.selection.resolve_choice`)."""
    config = OmegaConf.to_container(OmegaConf.load(SETTINGS_FILE), resolve=True)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    boot = {
        **config["bootstrap"],
        **{k: given[k] for k in ("iterations", "seed", "confidence") if k in given},
    }
    checkpoint = given.get("checkpoint", config["checkpoint"])
    split = given.get("split", config["split"])
    if checkpoint not in CHECKPOINT_CHOICES:
        raise ValueError(f"checkpoint must be one of {CHECKPOINT_CHOICES}, got {checkpoint!r}")
    if split not in SPLIT_CHOICES:
        raise ValueError(f"split must be one of {SPLIT_CHOICES}, got {split!r}")
    min_images = int(given.get("min_images", config["min_images"]))
    reach = float(given.get("reach", config["claims"]["reach"]))
    if reach <= 0:
        raise ValueError(f"claims.reach must be > 0, got {reach}")
    return RecordsChoice(
        checkpoint=checkpoint,
        split=split,
        bootstrap=BootstrapSettings(
            int(boot["iterations"]), int(boot["seed"]), float(boot["confidence"])
        ),
        multiplicity=check_method(str(given.get("multiplicity", config["multiplicity"]))),
        min_images=min_images,
        reach=reach,
    )


def _method(
    choice: RecordsChoice, arms: Sequence[Arm] | None = None, images: int | None = None
) -> str:
    seeds = ""
    if arms:
        seeds = "; seeds per arm: " + ", ".join(f"{a.name} {a.seeds}" for a in arms)
    on = f" over {images} images" if images else ""
    return (
        f"{choice.label}; {choice.bootstrap.confidence:.0%} percentile intervals from a "
        f"paired bootstrap{on} ({choice.bootstrap.iterations} replicates, seed "
        f"{choice.bootstrap.seed}: the same resampled images for every arm, drawn within "
        "strata of images labeled for the same tasks), plus the variance between seeds "
        "pooled over the arms compared (a Student-t draw on the seed means with the pooled "
        "degrees of freedom, image noise netted out)" + seeds + ". p = two-sided bootstrap "
        "p-value of no difference. Verdict: better / worse when p (adjusted, in the family) "
        "< " + f"{choice.bootstrap.alpha:g}, with the metric's direction (↑ higher is "
        "better, ↓ lower is better); 'these runs differ' when an arm has one seed."
    )


def seed_line(seeds: Mapping[str, int]) -> str:
    """One line on what the intervals say about seeds ('' when every arm has ≥ 2)."""
    single = [name for name, n in seeds.items() if n < 2]
    if not single:
        return ""
    how = (
        "give every arm ≥ 2 seeds (`--arm NAME=RUN,RUN,...` with runs of different seeds, "
        "or `make study`)"
    )
    if len(single) == len(seeds):
        return (
            "**Seed-to-seed variance is not covered**: every arm has one seed, so the "
            "intervals hold only the image sampling and a verdict says that *these runs* "
            f"differ, not that the method does; {how}."
        )
    return (
        f"**Seed-to-seed variance comes from the other arms only**: {', '.join(single)} "
        "ha" + ("s" if len(single) == 1 else "ve") + " one seed; the between-seed variance "
        "is pooled from the arms with several, and a verdict says that *these runs* differ, "
        f"not that the method does; {how}."
    )


def family_line(table: pd.DataFrame, choice: RecordsChoice) -> str:
    """The family the verdicts are adjusted over, the method and what is unadjusted."""
    members = int(table.attrs.get("family size", 0))
    if not members:
        return ""
    line = (
        f"Family: {table.attrs.get('family', '')} ({members} tests), adjusted together with "
        f"{METHODS[choice.multiplicity]} ({choice.multiplicity}, statsmodels); every other "
        "row (other metrics, other sizes) is unadjusted."
    )
    if choice.bootstrap.smallest_p > choice.bootstrap.alpha / members:
        line += (
            f" With {choice.bootstrap.iterations} replicates the smallest p-value is "
            f"{choice.bootstrap.smallest_p:.4f}, above {choice.bootstrap.alpha:g}/{members}: "
            "raise --bootstrap for the adjustment to find anything."
        )
    return line


def _notes_lines(table: pd.DataFrame) -> list[str]:
    notes = list(table.attrs.get("notes", ()))
    warned = table[table["warning"].fillna("").astype(bool)] if "warning" in table else table[:0]
    for (task, size), part in warned.groupby(["task", "size"], sort=False):
        notes.append(f"{task} @ {size} px: ⚠ {part['warning'].iloc[0]}")
    return [f"- {note}" for note in notes]


def arm_seeds(arms: Sequence[Arm]) -> dict[str, int]:
    return {a.name: a.seeds for a in arms}


def verdict_text(comparisons: pd.DataFrame, choice: RecordsChoice, arms: Sequence[Arm]) -> str:
    """The per-task verdict as a markdown table under a heading, then what it does not cover:
    the seed line, the family, and every task or image left out (printed by the CLI)."""
    table = verdict_table(comparisons, choice.bootstrap.confidence)
    if table.empty:
        return ""
    size = table.attrs["size"]
    at_size = comparisons[comparisons["size"] == size].drop_duplicates("task")
    images = ", ".join(
        f"{r['task']} {r['images']}"
        + (f" ({r['images left out']} left out)" if r["images left out"] else "")
        for r in at_size.to_dict("records")
    )
    heading = (
        f"Verdict per task ({size} px, main metric; {choice.label}; "
        f"{choice.bootstrap.confidence:.0%} intervals; images: {images}; seeds: "
        + ", ".join(f"{a.name} {a.seeds}" for a in arms)
        + ")"
    )
    lines = [heading, "", plain_markdown(table), ""]
    for extra in (seed_line(arm_seeds(arms)), family_line(comparisons, choice)):
        if extra:
            lines.append(extra)
    lines += _notes_lines(comparisons)
    return "\n".join(lines).rstrip()


def _comparison_markdown(comparisons: pd.DataFrame) -> str:
    """The full table of differences, one markdown table per eval size."""
    lines = []
    for size, part in comparisons.groupby("size", sort=True):
        rows = pd.DataFrame(
            {
                "task": part["task"],
                "metric": part["metric"].map(metric_label),
                "arm": part["arm"],
                "reference (mean ± std)": [
                    _mean_std_ci(r, "reference ") for r in part.to_dict("records")
                ],
                "arm (mean ± std)": [_mean_std_ci(r, "") for r in part.to_dict("records")],
                "Δ": part["difference"].map(lambda v: f"{v:+.4f}"),
                "interval": [
                    f"[{r['difference low']:+.4f}, {r['difference high']:+.4f}]"
                    for r in part.to_dict("records")
                ],
                "p": part["p"].map(format_p),
                "p adj.": part["p adjusted"].map(format_p),
                "verdict": [
                    r["verdict"] + ("" if r["adjustment"] != UNADJUSTED else " (unadjusted)")
                    for r in part.to_dict("records")
                ],
                "images": part["images"],
            }
        )
        left = int(part["images left out"].max())
        note = f" ({left} image(s) not in every run's records left out)" if left else ""
        lines += [f"### {size} px{note}", "", plain_markdown(rows), ""]
    return "\n".join(lines)


def _mean_std_ci(row: Mapping[str, Any], prefix: str) -> str:
    value, std = row[f"{prefix}value"], row[f"{prefix}std"]
    spread = "" if math.isnan(std) else f" ± {std:.4f}"
    return f"{value:.4f}{spread} [{row[f'{prefix}low']:.4f}, {row[f'{prefix}high']:.4f}]"


def markdown_report(
    items: Sequence[Run | Arm],
    images: Mapping[str, str] | None = None,
    comparisons: pd.DataFrame | None = None,
    choice: RecordsChoice | None = None,
    missing: Sequence[Path] = (),
    claims: pd.DataFrame | None = None,
) -> str:
    """The comparison as markdown: runs; the differences between arms with their intervals
    and verdicts (from the evaluation records); switch jumps; final/best metrics per
    resolution (per run).

    Args:
        items: Loaded runs (each its own arm) or arms; the first is the reference of every
            difference.
        images: Optional ``{caption: relative path}`` of figures to link at the top.
        comparisons: :func:`~ssl_mt.compare.tables.comparison_table` (None: not computed).
        choice: The records and bootstrap settings behind ``comparisons``.
        missing: Runs without evaluation records (named in the report).
        claims: :func:`~ssl_mt.compare.claims.claims_table` (None: not computed).
    """
    arms = as_arms(items)
    runs = [run for arm in arms for run in arm.runs]
    first = runs[0]
    lines = ["# Run comparison: " + " vs ".join(r.name for r in runs), ""]
    lines += [
        "| run | folder | epochs | eval sizes (px) | resolution switches |",
        "|---|---|---:|---|---|",
    ]
    for run in runs:
        epochs = int(run.val.index.max()) + 1 if len(run.val.index) else 0
        switches = ", ".join(f"{s.label} at epoch {s.epoch}" for s in run.switches) or "none"
        sizes = ", ".join(str(s) for s in run.eval_sizes)
        lines.append(f"| {run.name} | `{run.path}` | {epochs} | {sizes} | {switches} |")
    lines.append("")
    if images:
        for caption, target in images.items():
            lines += [f"![{caption}]({target})", ""]
    if len(arms) > 1 and choice is not None:
        lines += [f"## Differences between arms ({arms[0].name} is the reference)", ""]
        if missing:
            lines += [
                "No per-image evaluation records (RUN/eval/"
                f"{choice.checkpoint}/{choice.split}_<size>.csv.gz, written at the end of "
                "fine-tuning) in: " + ", ".join(f"`{p}`" for p in missing) + ". Without them "
                "there are no intervals, so no verdict.",
                "",
            ]
        elif comparisons is not None and not comparisons.empty:
            lines += [_method(choice, arms), "", verdict_text(comparisons, choice, arms), ""]
            lines += ["All metrics and sizes: value [interval] per arm, Δ = arm − reference.", ""]
            lines += [_comparison_markdown(comparisons)]
    if claims is not None:
        lines += [claims_markdown(claims, choice), ""]
    lines += ["## Per-run jumps of the logged validation loss (no interval)", ""]
    jumps = jump_table(runs)
    if jumps.empty:
        lines += ["No run changed its training resolution: no jump to measure.", ""]
    else:
        lines += [
            "before = val loss at the last epoch before the switch, after = at the first epoch "
            "of the new stage, jump = after − before (positive: the loss went up)."
            + (
                f" Δ jump = jump of the run − jump of {first.name}: negative means the run's "
                f"loss jumped less than {first.name}'s."
                if len(runs) > 1
                else ""
            ),
            "",
        ]
        lines += [dataframe_to_markdown(jumps), ""]
    lines += [
        "## Final and best validation metrics",
        "",
        "final = last epoch; best = max for scores (↑), min for losses (↓); best epoch is "
        "0-based" + (f"; Δ = run − {first.name}." if len(runs) > 1 else "."),
        "",
    ]
    table = _metric_column(summary_table(runs))
    for size in table.index.get_level_values("size").unique():
        part = table.xs(size, level="size")
        lines += [f"### val @ {size} px", "", dataframe_to_markdown(part), ""]
    return "\n".join(lines)


def write_report(
    items: Sequence[Run | Arm],
    out: str | Path,
    logy: bool = True,
    choice: RecordsChoice | None = None,
) -> dict[str, Path]:
    """:func:`write_comparison` without the table: the paths written."""
    return write_comparison(items, out, logy, choice)[0]


def write_comparison(
    items: Sequence[Run | Arm],
    out: str | Path,
    logy: bool = True,
    choice: RecordsChoice | None = None,
) -> tuple[dict[str, Path], pd.DataFrame | None]:
    """Writes ``val_loss.png``, ``train_loss.png``, ``report.md``, ``summary.csv``,
    ``jumps.csv`` and, with evaluation records in every run, ``differences.png`` and
    ``comparisons.csv`` into ``out``.

    Returns:
        The paths by key (``report``, ``val_loss``, ``train_loss``, ``summary``, ``jumps``,
        and ``differences``, ``comparisons`` when computed) and the comparison table (None
        with one arm or when a run has no records).
    """
    arms = as_arms(items)
    runs = [run for arm in arms for run in arm.runs]
    choice = choice or load_choice()
    if not choice.resolved:
        choice = resolve_choice(choice, [(run.path, run.config) for run in runs])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "val_loss": save_figure(plot_val_losses(arms, logy=logy), out / "val_loss.png"),
        "train_loss": save_figure(plot_train_losses(arms, logy=logy), out / "train_loss.png"),
    }
    images = {
        "validation loss per resolution": paths["val_loss"].name,
        "training loss": paths["train_loss"].name,
    }
    missing: list[Path] = []
    comparisons = None
    if len(arms) > 1:
        _, missing = arm_records(arms, choice.checkpoint, choice.split)
        if not missing:
            comparisons = comparison_table(arms, choice)
            paths["comparisons"] = out / "comparisons.csv"
            comparisons.to_csv(paths["comparisons"], index=False)
            paths["differences"] = save_figure(
                plot_differences(comparisons), out / "differences.png"
            )
            images = {"differences with their intervals": paths["differences"].name, **images}
    claims = None
    if len(arms) > 1:
        claims = claims_table(
            [a.name for a in arms],
            [[run.path for run in a.runs] for a in arms],
            runs[0].config,
            runs[0].switches,
            choice,
        )
        paths["claims"] = out / "claims.csv"
        claims.to_csv(paths["claims"], index=False)
    report = out / "report.md"
    text = markdown_report(arms, images, comparisons, choice, missing, claims)
    report.write_text(text + "\n", encoding="utf-8")
    paths["report"] = report
    paths["summary"] = out / "summary.csv"
    flat_columns(summary_table(runs)).to_csv(paths["summary"])
    paths["jumps"] = out / "jumps.csv"
    if claims is not None and not claims.empty:  # with intervals
        claims[claims["statistic"] == JUMP].to_csv(paths["jumps"], index=False)
    else:  # the logged curves of each run, no interval
        flat_columns(jump_table(runs)).to_csv(paths["jumps"])
    if comparisons is not None and claims is not None:
        comparisons.attrs["claims"] = claims
    return paths, comparisons


# -- label-efficiency study ---------------------------------------------------------------------------
def study_summary_text(table: pd.DataFrame, choice: RecordsChoice) -> str:
    """The study's verdicts: each task's main metric at the largest eval size, per label
    fraction, as a markdown table under a heading (``study.md`` opens with it; the CLI prints
    it)."""
    summary = study_summary(table, choice.bootstrap.confidence)
    if summary.empty:
        return ""
    size = summary.attrs["size"]
    at_size = table[table["size"] == size]
    images = ", ".join(
        f"{t} {n}" for t, n in at_size.groupby("task", sort=False)["images"].min().items()
    )
    reference = table.attrs.get("reference", table["reference"].iloc[0])
    seeds = {reference: _count_range(at_size["reference seeds"])}
    for arm, part in at_size.groupby("arm", sort=False):
        seeds.setdefault(arm, _count_range(part["seeds"]))
    heading = (
        f"## Verdict per task and label fraction ({size} px, main metric; "
        f"{choice.label}; {choice.bootstrap.confidence:.0%} intervals; "
        f"images: {images}; seeds: " + ", ".join(f"{a} {n}" for a, n in seeds.items()) + ")"
    )
    lines = [heading, "", plain_markdown(summary), ""]
    fewest = {arm: int(n.split("-")[0]) for arm, n in seeds.items()}
    for extra in (seed_line(fewest), family_line(table, choice)):
        if extra:
            lines.append(extra)
    lines += _notes_lines(table)
    return "\n".join(lines).rstrip()


def _count_range(counts: pd.Series) -> str:
    low, high = int(counts.min()), int(counts.max())
    return str(low) if low == high else f"{low}-{high}"


def study_markdown(table: pd.DataFrame, choice: RecordsChoice, image: str | None = None) -> str:
    """``study.md``: per task, metric and eval size, a table arm × label fraction."""
    reference = table.attrs.get("reference", table["reference"].iloc[0])
    lines = ["# Label efficiency", ""]
    if image:
        lines += [f"![label efficiency]({image})", ""]
    lines += [
        _method(choice) + f" Δ = arm − {reference} at the same label fraction.",
        "",
        study_summary_text(table, choice),
        "",
        "## Every metric and eval size",
        "",
    ]
    for (size, task, metric), part in table.groupby(["size", "task", "metric"], sort=False):
        rows = []
        for fraction, here in part.groupby("fraction", sort=True):
            first = here.iloc[0]
            rows.append(
                {
                    "fraction": f"{fraction:g}%",
                    "arm": reference,
                    "seeds": int(first["reference seeds"]),
                    "mean ± std [interval]": _mean_std_ci(first, "reference "),
                    "Δ [interval]": "reference",
                    "verdict": "",
                }
            )
            for r in here.to_dict("records"):
                if r["arm"] == reference:
                    continue
                rows.append(
                    {
                        "fraction": f"{fraction:g}%",
                        "arm": r["arm"],
                        "seeds": int(r["seeds"]),
                        "mean ± std [interval]": _mean_std_ci(r, ""),
                        "Δ [interval]": f"{r['difference']:+.4f} [{r['difference low']:+.4f}, "
                        f"{r['difference high']:+.4f}]",
                        "verdict": r["verdict"],
                    }
                )
        images = int(part["images"].min())
        lines += [
            f"### {task}: {metric_label(metric)} @ {size} px ({images} images)",
            "",
            plain_markdown(pd.DataFrame(rows)),
            "",
        ]
    return "\n".join(lines)


def write_study(
    cells: Sequence[StudyCell],
    out: str | Path,
    choice: RecordsChoice | None = None,
    reference: str | None = None,
) -> tuple[dict[str, Path], pd.DataFrame]:
    """Writes ``study.md``, ``study.png`` and ``study.csv`` (every row, unrounded) into ``out``."""
    choice = choice or load_choice()
    if not choice.resolved:
        choice = resolve_choice(choice, [(run, read_config(run)) for c in cells for run in c.runs])
    table = study_table(cells, choice, reference)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "figure": save_figure(plot_study(table, choice.bootstrap.confidence), out / "study.png")
    }
    claims = study_claims(cells, choice, table.attrs["reference"])
    table.attrs["claims"] = claims
    paths["report"] = out / "study.md"
    text = study_markdown(table, choice, paths["figure"].name)
    text += "\n" + claims_markdown(claims, choice, fraction=True)
    paths["report"].write_text(text + "\n", encoding="utf-8")
    paths["table"] = out / "study.csv"
    table.to_csv(paths["table"], index=False)
    paths["claims"] = out / "study_claims.csv"
    claims.to_csv(paths["claims"], index=False)
    return paths, table
