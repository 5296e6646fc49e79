"""Verdicts that hold up, on simulated per-image records with a known truth.

Simulation (as in test_statistics.py): per image a difficulty ``d ~ N(0, σ_d)`` shared by
every run, per run (seed) an offset ``u ~ N(0, σ_u)``, per (run, image) a loss
``μ_arm + d + u + e``, ``e ~ N(0, 1)``. The truth is ``μ_B − μ_A``.

Each check also runs the method it replaces and shows that the check fails for it:
per-arm (unpooled) seed variance with 1 vs 3 seeds, an unadjusted family, and the
unstratified bootstrap of the global loss with a task of 5 labeled images. Monte Carlo error
of a coverage estimated from n simulations: sqrt(p (1 − p) / n) ≈ 0.0069 at n = 1000.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pandas as pd
import pytest

from ssl_mt.compare.differences import comparison_rows
from ssl_mt.compare.ingredients import GLOBAL_LOSS, metric_value
from ssl_mt.compare.multiplicity import adjusted_p_values
from ssl_mt.compare.statistics import (
    NO_DIFFERENCE,
    RUNS_DIFFER,
    BootstrapSettings,
    bootstrap,
    bootstrap_functions,
    compare_arms,
    image_counts,
    interval,
    p_value,
)
from ssl_mt.evaluation.records import as_records

IMAGES = 100
ITERATIONS = 400
SIMULATIONS = 1000
MC_ERROR = math.sqrt(0.95 * 0.05 / SIMULATIONS)


def simulate(
    rng: np.random.Generator,
    seeds: tuple[int, int],
    sd_image: float,
    sd_seed: float,
    mus: tuple[float, float] = (0.5, 0.8),
    images: int = IMAGES,
) -> list[np.ndarray]:
    """Loss ingredients ``(S, N, 2)`` of arms A and B on the same images."""
    difficulty = rng.normal(0.0, sd_image, images)
    arms = []
    for mu, count in zip(mus, seeds, strict=True):
        offset = rng.normal(0.0, sd_seed, (count, 1))
        value = mu + difficulty + offset + rng.normal(0.0, 1.0, (count, images))
        arms.append(np.stack([value, np.ones_like(value)], axis=-1))
    return arms


def unpooled_interval(arms: list[np.ndarray], settings: BootstrapSettings):
    """Flawed (the method replaced): each arm's own between-seed variance, net of image
    noise, with Welch–Satterthwaite degrees of freedom; a 1-seed arm adds nothing."""
    draws = bootstrap(arms, "loss", settings)
    image = draws.image_replicates @ np.array([-1.0, 1.0])
    parts = [draws.between[a] / draws.seeds(a) for a in range(2)]
    dof = [draws.seeds(a) - 1 for a in range(2)]
    variance = sum(parts)
    if variance <= 0:
        return interval(image, settings)
    df = variance**2 / sum(p * p / d for p, d in zip(parts, dof, strict=True) if p > 0)
    rng = np.random.default_rng([settings.seed, 9])
    return interval(image + math.sqrt(variance) * rng.standard_t(df, len(image)), settings)


def coverage(seeds: tuple[int, int], sd_seed: float, flawed: bool = False) -> float:
    rng = np.random.default_rng(2024)
    hits = 0
    for k in range(SIMULATIONS):
        arms = simulate(rng, seeds, 1.0, sd_seed)
        settings = BootstrapSettings(ITERATIONS, k, 0.95)
        if flawed:
            low, high = unpooled_interval(arms, settings)
        else:
            (result,) = compare_arms(arms, ["A", "B"], "loss", settings)
            low, high = result.low, result.high
        hits += low <= 0.3 <= high
    return hits / SIMULATIONS


# -- seed variance -------------------------------------------------------------------------------------
def test_one_seed_per_arm_never_gives_a_method_verdict():
    """A/A with a per-run offset (σ²_seed = 4 σ²_img of the mean): a verdict appears often,
    but it is always about these runs, never 'better'/'worse' about the method."""
    rng = np.random.default_rng(5)
    verdicts = []
    for k in range(200):
        arms = simulate(rng, (1, 1), 1.0, 0.2, mus=(0.5, 0.5))
        (result,) = compare_arms(arms, ["A", "A'"], "loss", BootstrapSettings(ITERATIONS, k, 0.95))
        assert not result.method and not result.seed_variance
        verdicts.append(result.verdict)
    differ = [v for v in verdicts if v != NO_DIFFERENCE]
    assert differ, "the A/A runs differ by their offsets: some verdicts must say so"
    assert all(v.startswith(RUNS_DIFFER) for v in differ), set(verdicts)


def test_three_seeds_per_arm_cover_the_method_difference():
    rate = coverage((3, 3), sd_seed=0.4)
    assert 0.93 <= rate <= 0.97, f"coverage {rate:.3f} ± {MC_ERROR:.3f} (MC)"


def test_one_against_three_seeds_pools_the_seed_variance():
    """The 1-seed arm is not noise-free: it takes the pooled between-seed variance. The
    per-arm (Welch) interval it replaces treats it as exact and undercovers."""
    rate = coverage((1, 3), sd_seed=0.4)
    assert 0.93 <= rate <= 0.97, f"pooled: coverage {rate:.3f} ± {MC_ERROR:.3f} (MC)"
    flawed = coverage((1, 3), sd_seed=0.4, flawed=True)
    assert flawed < 0.92, f"unpooled: coverage {flawed:.3f}, should undercover"


# -- multiplicity ----------------------------------------------------------------------------------------
FAMILY = 12
FAMILY_SIMULATIONS = 400
FAMILY_SETTINGS_ITERATIONS = 1000  # p-values down to 2/1001, below Holm's 0.05/12


def _family_p_values(rng: np.random.Generator, k: int, effect: float) -> np.ndarray:
    """12 metrics on the same images (as tasks share them), 3 seeds per arm; the first one
    has a true effect ``effect``, the others none."""
    by_metric = {}
    for member in range(FAMILY):
        mus = (0.5, 0.5 - (effect if member == 0 else 0.0))
        by_metric[f"loss{member}"] = simulate(rng, (3, 3), 1.0, 0.1, mus=mus, images=80)
    settings = BootstrapSettings(FAMILY_SETTINGS_ITERATIONS, k, 0.95)
    loss = partial(metric_value, "loss")
    groups = [(arms, {name: loss}) for name, arms in by_metric.items()]
    draws = bootstrap_functions(groups, settings)  # the same image draws for all 12
    return np.array([p_value(d.replicates([-1.0, 1.0])) for d in draws.values()])


@pytest.fixture(scope="module")
def family_p_values() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(77)
    nulls = np.stack([_family_p_values(rng, k, 0.0) for k in range(FAMILY_SIMULATIONS)])
    effects = np.stack([_family_p_values(rng, k, 1.1) for k in range(FAMILY_SIMULATIONS)])
    return {"null": nulls, "effect": effects}


def test_holm_keeps_the_family_wise_error_of_twelve_nulls(family_p_values):
    nulls = family_p_values["null"]
    error = math.sqrt(0.05 * 0.95 / FAMILY_SIMULATIONS)
    holm = np.mean([(adjusted_p_values(p, "holm") < 0.05).any() for p in nulls])
    raw = np.mean([(p < 0.05).any() for p in nulls])
    assert holm <= 0.05 + 2 * error, f"Holm FWER {holm:.3f} (MC ± {error:.3f})"
    assert raw > 0.25, f"unadjusted FWER {raw:.3f}: the check must fail for it"


def test_holm_still_detects_a_stated_effect(family_p_values):
    """An effect of 1.1 loss units (3 seeds, 80 images) on one member of 12."""
    effects = family_p_values["effect"]
    power = np.mean([adjusted_p_values(p, "holm")[0] < 0.05 for p in effects])
    others = np.mean([(adjusted_p_values(p, "holm")[1:] < 0.05).any() for p in effects])
    assert power >= 0.8, f"power {power:.3f}"
    assert others <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / FAMILY_SIMULATIONS)


def test_p_value_agrees_with_the_interval():
    rng = np.random.default_rng(1)
    settings = BootstrapSettings(2000, 0, 0.95)
    for shift in (0.0, 0.1, 0.25, 0.5):
        replicates = rng.normal(shift, 0.1, 2000)
        low, high = interval(replicates, settings)
        assert (p_value(replicates) < 0.05) == (low > 0 or high < 0)
    assert p_value(np.ones(999)) == pytest.approx(2 / 1000)


# -- sparse tasks ----------------------------------------------------------------------------------------
def _records(rng: np.random.Generator, quality: float, sparse: int) -> pd.DataFrame:
    images = [f"i{k:03d}.png" for k in range(100)]
    common = pd.DataFrame(
        {"image": images, "task": "blur", "loss": rng.normal(1.0 - quality, 0.3, 100)}
    )
    common["target"] = rng.integers(0, 3, 100)
    common["pred"] = np.where(rng.random(100) < 0.5 + quality, common["target"], 0)
    rare = pd.DataFrame(
        {"image": images[:sparse], "task": "tone", "loss": rng.normal(2.0, 0.3, sparse)}
    )
    rare["target"] = rng.integers(0, 10, sparse)
    rare["pred"] = rare["target"]
    return as_records([common, rare])


def test_a_task_with_five_labeled_images_gets_an_interval_and_a_warning():
    rng = np.random.default_rng(3)
    per_arm = [[{64: _records(rng, q, 5)}] for q in (0.0, 0.1)]
    config = {
        "tasks": {"blur": {"classes": ["a", "b", "c"]}, "tone": {"classes": list("abcdefghij")}}
    }
    notes: list[str] = []
    rows = comparison_rows(
        ["A", "B"], per_arm, config, BootstrapSettings(ITERATIONS, 0, 0.95), 30, notes
    )
    table = pd.DataFrame(rows)
    tone = table[table["task"] == "tone"]
    assert (tone["images"] == 5).all() and tone["warning"].str.contains("only 5 image").all()
    glob = table[table["task"] == "global"].iloc[0]
    assert math.isfinite(glob["difference low"]) and math.isfinite(glob["difference high"])
    assert glob["warning"] == ""  # 100 images in the global loss


def test_the_unstratified_bootstrap_of_the_global_loss_fails_on_a_sparse_task():
    """What stratification prevents: a replicate without any of the task's 5 images."""
    rng = np.random.default_rng(4)
    n, sparse = 100, 5
    loss = np.zeros((1, n, 4))
    loss[0, :, 0], loss[0, :, 1] = rng.normal(1.0, 0.3, n), 1.0
    loss[0, :sparse, 2], loss[0, :sparse, 3] = rng.normal(2.0, 0.3, sparse), 1.0
    counts = image_counts(np.random.default_rng(0), 2000, n)
    with np.errstate(divide="ignore", invalid="ignore"):
        values = metric_value(GLOBAL_LOSS, counts @ loss[0])
    assert np.isnan(values).any()  # the unstratified draw
    with pytest.raises(ValueError, match="NaN"):
        interval(values, BootstrapSettings(2000, 0, 0.95))
    from ssl_mt.compare.statistics import strata_of

    strata = strata_of(loss[0][:, 1::2] > 0)
    draws = bootstrap([loss, loss + 0.01], GLOBAL_LOSS, BootstrapSettings(2000, 0, 0.95), strata)
    assert np.isfinite(draws.image_replicates).all()


def _image_coverage(images: int) -> float:
    """Coverage of the percentile interval over images alone (one seed per arm, no seed
    offset: the truth is what these runs estimate)."""
    rng = np.random.default_rng(11)
    hits = 0
    for k in range(SIMULATIONS):
        arms = simulate(rng, (1, 1), 1.0, 0.0, images=images)
        (result,) = compare_arms(arms, ["A", "B"], "loss", BootstrapSettings(ITERATIONS, k, 0.95))
        hits += result.low <= 0.3 <= result.high
    return hits / SIMULATIONS


def test_the_percentile_interval_undercovers_below_min_images():
    """Why conf/compare.yaml's min_images (30) warns: measured 0.84 at 5 images, 0.89 at
    10, 0.93 at 30, 0.95 at 100 (1000 simulations each, MC error ≈ 0.007)."""
    assert _image_coverage(5) < 0.90
    assert 0.91 <= _image_coverage(30) <= 0.97
    assert 0.93 <= _image_coverage(100) <= 0.97
