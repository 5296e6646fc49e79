"""The claims about the val-loss curves in words: markdown sections and the printed summary."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

from ssl_mt.compare.claims import CLAIMS
from ssl_mt.compare.differences import format_p, mean_std
from ssl_mt.compare.keys import GLOBAL, METRIC_LABELS, REACH
from ssl_mt.compare.multiplicity import METHODS, UNADJUSTED
from ssl_mt.compare.selection import RecordsChoice
from ssl_mt.compare.tables import plain_markdown

CLAIMS_METHOD = (
    "Statistics of each run's val-loss curve, from the per-image val losses of every epoch "
    "(RUN/eval/curves): **jump** = loss at the first epoch of a new stage − at the last "
    "epoch before it; **AUC** = mean loss over the epochs; **epochs to reach** = epochs "
    "trained until the loss first is ≤ {reach:g} × the reference arm's final loss "
    "(interpolated; one past the end when never); **roughness** = (Σ|Δ| − |ΣΔ|) per "
    "epoch-to-epoch change within the stages (0 for a curve that only goes down). All are "
    "lower-is-better. Intervals and p-values as for the metrics: paired, stratified "
    "bootstrap over the images and the pooled seed variance. Each claim is its own family."
)


def claim_cells(row: Mapping[str, Any], first: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One row of a claims table as printed."""
    statistic = METRIC_LABELS.get(row["statistic"], row["statistic"])
    if row["switch"]:
        statistic += f" ({row['switch']})"
    if row["statistic"] == REACH and not math.isnan(row["target"]):
        statistic += f" (≤ {row['target']:.4f})"
    verdict = row["verdict"]
    if row.get("adjustment") == UNADJUSTED:
        verdict += " (unadjusted)"
    return {
        **(first or {}),
        "task": row["task"],
        "statistic ↓": statistic,
        f"{row['reference']} (reference)": mean_std(row["reference value"], row["reference std"]),
        "arm": row["arm"],
        "arm value": mean_std(row["value"], row["std"]),
        "Δ [interval]": f"{row['difference']:+.4f} [{row['difference low']:+.4f}, "
        f"{row['difference high']:+.4f}]",
        "p": format_p(row["p"]),
        "p adj.": format_p(row["p adjusted"]),
        "verdict": verdict,
    }


def _family_lines(table: pd.DataFrame, choice: RecordsChoice) -> list[str]:
    lines = []
    for label in table.loc[table["adjustment"] != UNADJUSTED, "adjustment"].unique():
        lines.append(f"- {label}")
    if lines:
        lines.insert(0, f"Families ({METHODS[choice.multiplicity]}, statsmodels):")
    return lines


def claims_markdown(table: pd.DataFrame, choice: RecordsChoice, fraction: bool = False) -> str:
    """The claims section: method, per claim a table at the largest size (its family), then
    every other size (unadjusted)."""
    lines = ["## The claims about the curves: resolution change, faster, smoother", ""]
    missing = table.attrs.get("missing", [])
    if missing:
        lines += [
            "No curve records (RUN/eval/curves, written by the `curve_records` callback of "
            "fine-tuning) in: " + ", ".join(f"`{p}`" for p in missing) + ". Without them the "
            "claims have no interval; the per-run jumps from metrics.csv follow.",
            "",
        ]
        return "\n".join(lines)
    if table.empty:
        lines += ["No claim could be measured (see the notes).", ""]
    lines += [CLAIMS_METHOD.format(reach=choice.reach), ""]
    size = max(table["size"]) if not table.empty else None
    for claim, _ in CLAIMS:
        part = table[(table["claim"] == claim) & (table["size"] == size)]
        part = part[part["arm"] != part["reference"]]
        if part.empty:
            continue
        # tasks in the table's (the config's) order, the global loss last
        tasks = {task: k for k, task in enumerate(dict.fromkeys(table["task"]))}
        part = part.assign(_task=part["task"].map(tasks))
        order = ["fraction", "_task"] if fraction else ["_task"]
        rows = [
            claim_cells(r, {"labels": f"{r['fraction']:g}%"} if fraction else None)
            for r in part.sort_values(order, kind="stable").to_dict("records")
        ]
        lines += [f"### {claim} @ {size} px", "", plain_markdown(pd.DataFrame(rows)), ""]
    lines += _family_lines(table, choice)
    others = table[(table["size"] != size) & (table["arm"] != table["reference"])]
    if not others.empty:
        rows = [
            claim_cells(
                r,
                {"size": r["size"], **({"labels": f"{r['fraction']:g}%"} if fraction else {})},
            )
            for r in others.to_dict("records")
        ]
        lines += ["", "Other sizes (unadjusted):", "", plain_markdown(pd.DataFrame(rows))]
    notes = table.attrs.get("notes", [])
    if notes:
        lines += ["", *[f"- {note}" for note in notes]]
    return "\n".join(lines).rstrip() + "\n"


def claims_summary(table: pd.DataFrame) -> str:
    """The global-loss row of every claim statistic at the largest size (printed)."""
    if table.empty:
        return ""
    size = max(table["size"])
    part = table[(table["size"] == size) & (table["task"] == GLOBAL)]
    part = part[part["arm"] != part["reference"]]
    if part.empty:
        return ""
    heading = f"Claims about the global val-loss curve @ {size} px (each claim its own family)"
    by_fraction = "fraction" in part.columns
    if by_fraction:
        part = part.sort_values(["statistic", "fraction"], kind="stable")
    cells = [
        claim_cells(r, {"labels": f"{r['fraction']:g}%"} if by_fraction else None)
        for r in part.to_dict("records")
    ]
    return heading + "\n\n" + plain_markdown(pd.DataFrame(cells))
