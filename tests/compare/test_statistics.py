"""The intervals of ssl_mt.compare.statistics on simulated per-image records with a known truth.

Simulation: per image a difficulty ``d ~ N(0, σ_d)`` shared by both arms (the same images),
per training run (seed) an offset ``u ~ N(0, σ_u)``; per (run, image) a loss
``μ_arm + d + u + e`` (e ~ N(0, 1)) or a top-1 outcome ``Bernoulli(sigmoid(μ_arm + d + u))``.
The true difference is the population one: ``μ_B − μ_A`` for the loss, the difference of
``E[sigmoid(μ + Z)]``, ``Z ~ N(0, σ_d² + σ_u²)``, for top-1 (Gauss–Hermite quadrature).

The coverage checks also run two flawed intervals — one that resamples images
independently per arm (ignores pairing) and one that ignores the variance between seeds —
to show that the checks tell a right interval from a wrong one.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from ssl_mt.compare.ingredients import ingredients, metric_value
from ssl_mt.compare.statistics import (
    BETTER,
    NO_DIFFERENCE,
    WORSE,
    BootstrapSettings,
    bootstrap,
    compare_arms,
    image_counts,
    interval,
    verdict,
)

SIMULATIONS = 200
IMAGES = 150
ITERATIONS = 400
SETTINGS = BootstrapSettings(iterations=ITERATIONS, seed=0, confidence=0.95)
MU_A, MU_B = 0.5, 0.8


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def population_top1(mu: float, spread: float) -> float:
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    return float((_sigmoid(mu + spread * nodes) * weights).sum() / weights.sum())


def simulate(
    rng: np.random.Generator,
    metric: str,
    seeds: int,
    sd_image: float,
    sd_seed: float,
    mus: tuple[float, float] = (MU_A, MU_B),
) -> list[np.ndarray]:
    """Ingredients ``(seeds, IMAGES, 2)`` of arms A and B on the same images."""
    difficulty = rng.normal(0.0, sd_image, IMAGES)
    arms = []
    for mu in mus:
        offset = rng.normal(0.0, sd_seed, (seeds, 1))
        if metric == "top1":
            value = (rng.random((seeds, IMAGES)) < _sigmoid(mu + difficulty + offset)).astype(float)
        else:
            value = mu + difficulty + offset + rng.normal(0.0, 1.0, (seeds, IMAGES))
        arms.append(np.stack([value, np.ones_like(value)], axis=-1))
    return arms


def truth(
    metric: str, sd_image: float, sd_seed: float, mus: tuple[float, float] = (MU_A, MU_B)
) -> float:
    if metric == "loss":
        return mus[1] - mus[0]
    spread = math.hypot(sd_image, sd_seed)
    return population_top1(mus[1], spread) - population_top1(mus[0], spread)


def unpaired_interval(arms: list[np.ndarray], metric: str, rng: np.random.Generator):
    """Flawed: each arm's images resampled on their own (pairing ignored)."""
    values = []
    for x in arms:
        counts = image_counts(rng, ITERATIONS, IMAGES)
        values.append(metric_value(metric, counts @ x.mean(axis=0)))
    return interval(values[1] - values[0], SETTINGS)


def seedless_interval(arms: list[np.ndarray], metric: str, rng: np.random.Generator):
    """Flawed: a paired image bootstrap of the seed-averaged records (seed variance ignored)."""
    counts = image_counts(rng, ITERATIONS, IMAGES)
    a, b = (metric_value(metric, counts @ x.mean(axis=0)) for x in arms)
    return interval(b - a, SETTINGS)


def coverage(metric: str, seeds: int, sd_image: float, sd_seed: float) -> dict[str, float]:
    rng = np.random.default_rng(12345)
    true = truth(metric, sd_image, sd_seed)
    hits = {"ours": 0, "unpaired": 0, "seedless": 0}
    for k in range(SIMULATIONS):
        arms = simulate(rng, metric, seeds, sd_image, sd_seed)
        settings = BootstrapSettings(ITERATIONS, k, 0.95)
        (result,) = compare_arms(arms, ["A", "B"], metric, settings)
        intervals = {
            "ours": (result.low, result.high),
            "unpaired": unpaired_interval(arms, metric, rng),
            "seedless": seedless_interval(arms, metric, rng),
        }
        for name, (low, high) in intervals.items():
            hits[name] += low <= true <= high
    return {name: count / SIMULATIONS for name, count in hits.items()}


def test_paired_interval_covers_and_an_unpaired_one_does_not():
    """One seed per arm, images that differ a lot in difficulty: pairing is what matters."""
    rates = coverage("loss", seeds=1, sd_image=2.0, sd_seed=0.0)
    assert 0.90 <= rates["ours"] <= 0.99, rates
    assert not 0.90 <= rates["unpaired"] <= 0.99, rates  # far too wide: covers ~always


def test_interval_with_seed_variance_covers_and_one_without_does_not():
    """Three seeds per arm whose runs differ: the seed variance must be in the interval."""
    rates = coverage("loss", seeds=3, sd_image=1.0, sd_seed=0.4)
    assert 0.90 <= rates["ours"] <= 0.99, rates
    assert not 0.90 <= rates["seedless"] <= 0.99, rates  # too narrow


def test_interval_is_not_too_wide_when_seeds_agree():
    """Three seeds of runs that do not differ beyond their image noise (top-1 outcomes):
    resampling seeds on top of images would count that noise twice (coverage ~100%)."""
    rates = coverage("top1", seeds=3, sd_image=1.5, sd_seed=0.0)
    assert 0.90 <= rates["ours"] <= 0.99, rates


def test_a_a_comparison_finds_no_difference():
    rng = np.random.default_rng(7)
    arms = simulate(rng, "top1", seeds=3, sd_image=1.5, sd_seed=0.2)
    (same,) = compare_arms([arms[0], arms[0]], ["A", "A again"], "top1", SETTINGS)
    # The same runs twice: no difference, but the interval still holds what other seeds
    # could have given (the arms are samples of runs), centred on 0.
    assert same.difference == 0.0 and same.low < 0.0 < same.high
    assert same.low == pytest.approx(-same.high, rel=0.2) and same.p_value > 0.9
    assert same.verdict == NO_DIFFERENCE
    # Two arms from the same setup (different runs): "no detectable difference" in ≥ 90%.
    calls = []
    for k in range(50):
        difficulty = rng.normal(0.0, 1.5, IMAGES)
        pair = [
            np.stack(
                [(rng.random((3, IMAGES)) < _sigmoid(0.5 + difficulty)), np.ones((3, IMAGES))],
                axis=-1,
            ).astype(float)
            for _ in range(2)
        ]
        calls.append(compare_arms(pair, ["A", "A'"], "top1", BootstrapSettings(400, k, 0.95))[0])
    assert sum(c.verdict == NO_DIFFERENCE for c in calls) >= 45


def test_an_effect_of_stated_size_is_detected():
    """3 seeds, 150 images: a top-1 gain of ~0.15 (sigmoid(1.5 + d) vs sigmoid(0.5 + d)) is
    'better' in ≥ 90% of 50 simulations; a loss lower by 0.7 is 'better' too (its direction),
    and higher by 0.7 'worse'."""
    rng = np.random.default_rng(3)
    mus = (0.5, 1.5)
    effect = truth("top1", 1.5, 0.1, mus)
    assert 0.13 < effect < 0.17
    found = {"top1": 0, "lower loss": 0, "higher loss": 0}
    for k in range(50):
        settings = BootstrapSettings(400, k, 0.95)
        arms = simulate(rng, "top1", 3, 1.5, 0.1, mus)
        found["top1"] += compare_arms(arms, ["A", "B"], "top1", settings)[0].verdict == BETTER
        arms = simulate(rng, "loss", 3, 1.0, 0.1, (1.2, 0.5))
        found["lower loss"] += compare_arms(arms, ["A", "B"], "loss", settings)[0].verdict == BETTER
        arms = simulate(rng, "loss", 3, 1.0, 0.1, (0.5, 1.2))
        found["higher loss"] += compare_arms(arms, ["A", "B"], "loss", settings)[0].verdict == WORSE
    assert min(found.values()) >= 45, found


def test_verdict_follows_the_metric_direction_and_never_crosses_zero():
    assert verdict(0.01, 0.2, "iou") == BETTER
    assert verdict(-0.2, -0.01, "iou") == WORSE
    assert verdict(-0.2, -0.01, "loss") == BETTER
    assert verdict(0.01, 0.2, "loss") == WORSE
    assert verdict(-0.001, 0.5, "top1") == NO_DIFFERENCE
    assert verdict(-0.5, 0.0, "loss") == NO_DIFFERENCE
    assert verdict(math.nan, math.nan, "f1") == NO_DIFFERENCE


def test_metrics_from_records_match_their_definitions():
    records = pd.DataFrame(
        {
            "tp": [3, 0, 5],
            "fp": [1, 2, 0],
            "fn": [0, 4, 1],
            "target": [0, 1, 2],
            "pred": [0, 2, 2],
            "loss": [0.5, 1.5, 1.0],
        }
    )
    sums = ingredients(records, "iou").sum(axis=0)
    assert metric_value("iou", sums) == pytest.approx(8 / 16)
    assert metric_value("dice", ingredients(records, "dice").sum(axis=0)) == pytest.approx(16 / 24)
    assert metric_value("top1", ingredients(records, "top1").sum(axis=0)) == pytest.approx(2 / 3)
    assert metric_value("loss", ingredients(records, "loss").sum(axis=0)) == pytest.approx(1.0)
    # Macro F1 over classes 0..2 (class 3 never occurs: left out, as torchmetrics does):
    # class 0: 1.0; class 1: tp 0 → 0; class 2: tp 1, fp 1 → 2/3.
    f1 = metric_value("f1", ingredients(records, "f1", num_classes=4).sum(axis=0))
    assert f1 == pytest.approx((1.0 + 0.0 + 2 / 3) / 3)


def test_bootstrap_is_reproducible_and_needs_the_same_images():
    rng = np.random.default_rng(0)
    arms = simulate(rng, "loss", 2, 1.0, 0.2)
    first = bootstrap(arms, "loss", SETTINGS).replicates([-1.0, 1.0])
    again = bootstrap(arms, "loss", SETTINGS).replicates([-1.0, 1.0])
    assert np.array_equal(first, again)
    with pytest.raises(ValueError, match="images"):
        bootstrap([arms[0], arms[1][:, :-1]], "loss", SETTINGS)
    with pytest.raises(ValueError, match="iterations"):
        BootstrapSettings(iterations=10, seed=0, confidence=0.95)
