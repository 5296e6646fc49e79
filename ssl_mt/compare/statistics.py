"""Differences between arms with their uncertainty, from per-image evaluation records.

Every metric is a ratio of sums over images of per-image *ingredients*
(:mod:`ssl_mt.compare.ingredients`), so a bootstrap replicate is a weighted sum: image
counts (B, N) @ ingredients (N, k), one matrix product per seed.

Two sources of uncertainty, both in the interval:

- **images**: the evaluation set is a sample of images. Every replicate draws image counts
  once and applies them to every arm and seed (a *paired* bootstrap: the arms are compared
  on the same resampled images, so what an image's difficulty adds to both cancels out).
  The draw is *stratified*: images are resampled within strata of fixed size (for the
  global loss, the images that share a set of labeled tasks), so every replicate holds as
  many labeled images of each task as the data, and a task with 5 labeled images never
  vanishes from a replicate;
- **seeds**: each arm is a sample of training runs. Every seed is evaluated on the same
  images, so a seed's metric is the arm's value plus the run's own deviation (its training
  randomness and its noise on those images). The spread of the per-seed metrics estimates
  that deviation's variance (:func:`seed_spread`); the arms of a comparison share one
  *pooled* estimate (weighted by their degrees of freedom ``S_a − 1``, as a pooled t-test
  does), so an arm of one seed is never treated as free of seed noise. Each replicate adds
  a zero-mean Student-t draw with the pooled degrees of freedom, scaled to the variance of
  the seed means, to the image replicates shrunk to the part every seed shares
  (:meth:`Draws.replicates`): with 3 seeds the variance is known only roughly, and a normal
  draw would be too narrow. With one seed in every arm nothing estimates it: the interval
  covers the images only, and a verdict is about these runs, not about the method
  (:func:`worded_verdict`).

The interval is the percentile interval of the replicates, the p-value the two-sided
bootstrap p-value of 0 (consistent with it: p < 1 − confidence exactly when 0 lies outside
the interval, up to the replicate resolution). Verdicts of a declared family are adjusted
together (:mod:`ssl_mt.compare.multiplicity`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from ssl_mt.compare.ingredients import GLOBAL_LOSS, metric_value
from ssl_mt.compare.keys import CLAIM_RANGES

BETTER = "better"
WORSE = "worse"
NO_DIFFERENCE = "no detectable difference"
# With one seed in an arm the verdict is about the runs compared, not about their method.
RUNS_DIFFER = "these runs differ: "
LOWER_IS_BETTER = frozenset({"loss", GLOBAL_LOSS})
# Bootstrap image counts are built in blocks of at most this many (replicate, image) cells,
# so memory stays flat whatever the size of the validation set.
_BLOCK_CELLS = 4_000_000

ValueFunction = Callable[[np.ndarray], np.ndarray]


def is_score(metric: str) -> bool:
    """True when higher is better (everything but losses and the curve statistics)."""
    return metric not in LOWER_IS_BETTER and metric not in CLAIM_RANGES


@dataclass(frozen=True)
class BootstrapSettings:
    """How intervals are computed (``conf/compare.yaml``, overridable on the command line).

    Attributes:
        iterations: Bootstrap replicates.
        seed: Seed of the random generator; the same seed gives the same intervals.
        confidence: Coverage of the intervals (0.95: 95% intervals); also the level of the
            verdicts (a difference needs p < 1 − confidence, after adjustment in a family).
    """

    iterations: int
    seed: int
    confidence: float

    def __post_init__(self) -> None:
        if self.iterations < 100:
            raise ValueError(f"bootstrap iterations must be >= 100, got {self.iterations}")
        if not 0.5 <= self.confidence < 1.0:
            raise ValueError(f"confidence must be in [0.5, 1), got {self.confidence}")

    @property
    def quantiles(self) -> tuple[float, float]:
        alpha = 1.0 - self.confidence
        return alpha / 2, 1.0 - alpha / 2

    @property
    def alpha(self) -> float:
        return 1.0 - self.confidence

    @property
    def smallest_p(self) -> float:
        """The smallest bootstrap p-value these replicates can give: 2 / (B + 1)."""
        return 2.0 / (self.iterations + 1)


# -- bootstrap --------------------------------------------------------------------------------------
def image_counts(rng: np.random.Generator, replicates: int, n: int) -> np.ndarray:
    """How often each of ``n`` images is drawn in each replicate: (replicates, n) floats.

    Sampling ``n`` images with replacement, as integer indices counted with one
    ``bincount`` (several times faster than ``Generator.multinomial``).
    """
    picks = rng.integers(0, n, size=(replicates, n))
    picks += np.arange(replicates)[:, None] * n
    return np.bincount(picks.ravel(), minlength=replicates * n).reshape(replicates, n).astype(float)


def stratified_counts(
    rng: np.random.Generator, replicates: int, strata: Sequence[np.ndarray], n: int
) -> np.ndarray:
    """:func:`image_counts` drawn within each stratum: every replicate holds exactly as
    many images of each stratum as the data.

    Args:
        rng: The generator.
        replicates: Rows.
        strata: Disjoint index arrays covering ``range(n)``.
        n: Images.
    """
    counts = np.empty((replicates, n))
    for members in strata:
        counts[:, members] = image_counts(rng, replicates, len(members))
    return counts


def strata_of(labels: np.ndarray) -> list[np.ndarray]:
    """Strata of images with the same row of ``labels`` (N, T): the same labeled tasks."""
    labels = np.asarray(labels)
    if labels.ndim == 1:
        labels = labels[:, None]
    _, inverse = np.unique(labels, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    return [np.flatnonzero(inverse == k) for k in range(int(inverse.max(initial=-1)) + 1)]


def seed_spread(per_seed: np.ndarray, replicated: np.ndarray) -> tuple[float, float]:
    """What one arm's seeds tell about the variance between runs.

    Every seed is evaluated on the same images, so a seed's metric is the arm's value plus
    the run's own deviation (its training randomness *and* its own noise on those images);
    the images' shared difficulty is common to all seeds and drops out of their spread.

    Args:
        per_seed: (S,) each seed's metric on all images.
        replicated: (B, S) each seed's metric in every image replicate.

    Returns:
        ``(s², v)``: the spread of the per-seed metrics (``ddof=1``; the variance of a run's
        whole deviation), and ``v``, the part of it that is the run's noise on the images,
        as the image bootstrap sees it (the replicated variance of a seed's deviation from
        the mean over seeds, times ``S / (S − 1)``). ``(nan, nan)`` with one seed.
    """
    seeds = len(per_seed)
    if seeds < 2:
        return math.nan, math.nan
    spread = float(np.var(per_seed, ddof=1))
    deviations = replicated - replicated.mean(axis=1, keepdims=True)
    image_noise = float(deviations.var(axis=0, ddof=1).mean()) * seeds / (seeds - 1)
    return spread, image_noise


@dataclass(frozen=True)
class Draws:
    """Point estimates and bootstrap replicates of a metric for several arms.

    Attributes:
        per_seed: Per arm, the metric of every seed on all images: (S_a,) each.
        image_replicates: (B, A) each arm's mean over seeds in every (paired) image replicate.
        spread: (A,) each arm's spread of the per-seed metrics (NaN with one seed).
        image_noise: (A,) the part of it that is the runs' noise on the images (NaN with one).
        images: Number of images (the same for every arm).
        seed: Seed of the generator of the seed-variance draws.
    """

    per_seed: list[np.ndarray]
    image_replicates: np.ndarray
    spread: np.ndarray
    image_noise: np.ndarray
    images: int
    seed: int

    def value(self, arm: int) -> float:
        return float(self.per_seed[arm].mean())

    def std(self, arm: int) -> float:
        """Standard deviation over seeds (NaN with one seed)."""
        values = self.per_seed[arm]
        return float(values.std(ddof=1)) if len(values) > 1 else math.nan

    def seeds(self, arm: int) -> int:
        return len(self.per_seed[arm])

    @property
    def between(self) -> np.ndarray:
        """(A,) each arm's variance between runs net of its image noise, ``max(s² − v, 0)``
        of :func:`seed_spread` (0 with one seed)."""
        return np.nan_to_num(np.maximum(self.spread - self.image_noise, 0.0))

    def pooled(self, arms: Sequence[int] | None = None) -> tuple[float, float, int]:
        """``(s², v, dof)`` pooled over ``arms`` (default all) with weights ``S_a − 1``, as
        a pooled t-test pools: ``(nan, nan, 0)`` when every arm has one seed."""
        arms = list(range(len(self.per_seed)) if arms is None else arms)
        dof = [self.seeds(a) - 1 for a in arms]
        total = sum(dof)
        if total == 0:
            return math.nan, math.nan, 0
        used = [(a, d) for a, d in zip(arms, dof, strict=True) if d > 0]
        spread = sum(d * float(self.spread[a]) for a, d in used) / total
        noise = sum(d * float(self.image_noise[a]) for a, d in used) / total
        return spread, noise, total

    def covers_seeds(self, arms: Sequence[int] | None = None) -> bool:
        """True when the seed-to-seed variance is estimated: some arm has ≥ 2 seeds."""
        return self.pooled(arms)[2] > 0

    def replicates(
        self, weights: Sequence[float], pooled_over: Sequence[int] | None = None
    ) -> np.ndarray:
        """Replicates of ``Σ weights[a] · arm a`` over images and seeds: (B,).

        The estimate's variance has two parts. One is shared by every seed: the images'
        sample, through the arms' different responses to the same images; the paired image
        bootstrap carries it. The other is each run's own deviation, training randomness and
        noise on the images alike, whose variance the pooled spread ``s²`` of the per-seed
        metrics estimates with ``Σ (S_a − 1)`` degrees of freedom: ``s² · Σ w_a² / S_a``,
        drawn as a scaled Student t (the pooled t-test on the seed means). The image
        replicates hold that run noise too (``v · Σ w_a² / S_a``), so they are shrunk to the
        shared part before the t draw is added. With one seed in every arm nothing
        estimates the run part: the image bootstrap alone (an interval about these runs).

        Args:
            weights: One weight per arm.
            pooled_over: The arms whose seeds estimate the spread (default: those with a
                non-zero weight); an arm of one seed gets the spread of the others.
        """
        weights = np.asarray(weights, dtype=float)
        image = self.image_replicates @ weights
        used = [a for a, w in enumerate(weights) if w != 0.0]
        spread, noise, dof = self.pooled(used if pooled_over is None else pooled_over)
        if dof == 0:
            return image
        share = float(sum(weights[a] ** 2 / self.seeds(a) for a in used))
        image_variance = float(image.var(ddof=1)) if len(image) > 1 else 0.0
        shared = max(image_variance - noise * share, 0.0)
        scale = math.sqrt(shared / image_variance) if image_variance > 0 else 0.0
        rng = np.random.default_rng([self.seed, 1, *used])
        runs = math.sqrt(max(spread, 0.0) * share) * rng.standard_t(dof, size=len(image))
        return self.value_of(weights) + (image - image.mean()) * scale + runs

    def value_of(self, weights: Sequence[float]) -> float:
        """``Σ weights[a] · value(a)``: the point estimate of a weighted combination."""
        return float(sum(w * self.value(a) for a, w in enumerate(weights) if w != 0.0))


def bootstrap(
    arms: Sequence[np.ndarray],
    metric: str,
    settings: BootstrapSettings,
    strata: Sequence[np.ndarray] | None = None,
) -> Draws:
    """Paired bootstrap over images plus the between-run variance of every arm.

    Args:
        arms: Per arm, the ingredients ``(S, N, k)``: S seeds (runs), N images (the same
            images in the same order for every arm and seed), k ingredients of ``metric``.
        metric: The metric (see :func:`metric_value`).
        settings: Replicates, random seed.
        strata: Images resampled within each of these index arrays (default: one stratum).
    """
    return bootstrap_metrics({metric: arms}, settings, strata)[metric]


def bootstrap_metrics(
    arms_by_metric: Mapping[str, Sequence[np.ndarray]],
    settings: BootstrapSettings,
    strata: Sequence[np.ndarray] | None = None,
) -> dict[str, Draws]:
    """:func:`bootstrap` of several metrics on the same images, with the same image draws
    (drawn once: at 30k images they cost more than the sums). Each metric's draws equal
    those of :func:`bootstrap` of that metric alone."""
    groups = [
        (arms, {metric: partial(metric_value, metric)}) for metric, arms in arms_by_metric.items()
    ]
    return bootstrap_functions(groups, settings, strata)


def bootstrap_functions(
    groups: Sequence[tuple[Sequence[np.ndarray], Mapping[str, ValueFunction]]],
    settings: BootstrapSettings,
    strata: Sequence[np.ndarray] | None = None,
) -> dict[str, Draws]:
    """The paired, stratified bootstrap of named statistics of ingredient sums.

    Args:
        groups: ``(arms, functions)``: per arm the ingredients ``(S, N, k)`` (N the same
            images for every group), and the statistics computed from their sums, each a
            function of ``(..., k)`` sums to ``(...)`` values. The image draws are the same
            for every group; one matrix product per arm and group serves all its functions.
        settings: Replicates and seed.
        strata: Images resampled within each of these index arrays (default: one stratum).

    Raises:
        ValueError: No arm, arms on different images, or no image.
    """
    shapes = [x.shape for arms, _ in groups for x in arms]
    if not shapes or any(not arms for arms, _ in groups):
        raise ValueError("no arm to bootstrap")
    n = shapes[0][1]
    if any(len(shape) != 3 or shape[1] != n for shape in shapes):
        raise ValueError(f"every arm needs (seeds, {n} images, k) ingredients: {shapes}")
    if n == 0:
        raise ValueError("no image to bootstrap over")
    strata = [np.arange(n)] if strata is None else list(strata)
    if sum(len(s) for s in strata) != n:
        raise ValueError(f"strata of {sum(len(s) for s in strata)} images for {n} images")
    rng = np.random.default_rng(settings.seed)
    iterations = settings.iterations
    replicated = {
        name: [np.empty((iterations, x.shape[0])) for x in arms]
        for arms, functions in groups
        for name in functions
    }
    block = max(1, _BLOCK_CELLS // n)
    for start in range(0, iterations, block):
        rows = min(block, iterations - start)
        counts = stratified_counts(rng, rows, strata, n)  # the same for all arms and groups
        for arms, functions in groups:
            for a, x in enumerate(arms):
                seeds, _, k = x.shape
                # One matrix product for all seeds: (b, N) @ (N, S·k).
                sums = (counts @ x.transpose(1, 0, 2).reshape(n, seeds * k)).reshape(rows, seeds, k)
                for name, function in functions.items():
                    replicated[name][a][start : start + rows] = function(sums)
    draws = {}
    for arms, functions in groups:
        for name, function in functions.items():
            per_seed = [np.asarray(function(x.sum(axis=1)), dtype=float) for x in arms]
            values = replicated[name]
            spreads = [seed_spread(p, v) for p, v in zip(per_seed, values, strict=True)]
            draws[name] = Draws(
                per_seed=per_seed,
                image_replicates=np.stack([v.mean(axis=1) for v in values], axis=1),
                spread=np.array([spread for spread, _ in spreads]),
                image_noise=np.array([noise for _, noise in spreads]),
                images=n,
                seed=settings.seed,
            )
    return draws


def interval(replicates: np.ndarray, settings: BootstrapSettings) -> tuple[float, float]:
    """The percentile interval of bootstrap replicates (NaN replicates are an error)."""
    replicates = np.asarray(replicates, dtype=float)
    if np.isnan(replicates).any():
        raise ValueError("NaN bootstrap replicates: a metric without any labeled image")
    low, high = np.quantile(replicates, settings.quantiles)
    return float(low), float(high)


def p_value(replicates: np.ndarray) -> float:
    """The two-sided bootstrap p-value of "no difference": twice the smaller share of
    replicates on either side of 0 (each counted with the ``+1`` of an exact test, so it is
    never 0; the smallest is ``2 / (B + 1)``)."""
    replicates = np.asarray(replicates, dtype=float)
    if np.isnan(replicates).any():
        raise ValueError("NaN bootstrap replicates: a metric without any labeled image")
    b = len(replicates)
    below = int((replicates <= 0).sum())
    above = int((replicates >= 0).sum())
    return min(1.0, 2.0 * (min(below, above) + 1) / (b + 1))


def direction(difference: float, metric: str) -> str:
    """``better`` or ``worse`` for a difference B − A, with the metric's direction."""
    return BETTER if (difference > 0) == is_score(metric) else WORSE


def worded_verdict(found: str | None, method: bool) -> str:
    """The verdict as printed: ``better`` / ``worse`` about the method (``method``: every arm
    has ≥ 2 seeds), ``these runs differ: better`` about the runs (one seed in an arm), or
    ``no detectable difference`` (``found`` None)."""
    if found is None:
        return NO_DIFFERENCE
    return found if method else RUNS_DIFFER + found


def verdict_direction(verdict: str) -> str:
    """``better`` / ``worse`` / ``no detectable difference`` of a worded verdict."""
    return verdict.removeprefix(RUNS_DIFFER)


def verdict(low: float, high: float, metric: str) -> str:
    """``better`` / ``worse`` / ``no detectable difference`` for an interval of B − A.

    ``better`` needs the whole interval on the good side of 0 (above for a score, below for a
    loss); an interval that contains 0 is never a difference.
    """
    if math.isnan(low) or math.isnan(high):
        return NO_DIFFERENCE
    if low > 0:
        return direction(1.0, metric)
    if high < 0:
        return direction(-1.0, metric)
    return NO_DIFFERENCE


@dataclass(frozen=True)
class ArmSummary:
    """One arm's value on a metric: mean over seeds, std over seeds (NaN with one), number
    of seeds and the interval of the value (seeds and images)."""

    name: str
    value: float
    std: float
    seeds: int
    low: float
    high: float


@dataclass(frozen=True)
class Comparison:
    """One arm against the reference arm on one metric.

    Attributes:
        metric: The metric name.
        reference: The reference arm's :class:`ArmSummary`.
        arm: The compared arm's :class:`ArmSummary`.
        difference: arm − reference (mean over seeds of each).
        low, high: The interval of the difference.
        verdict: From the interval alone (unadjusted), worded by :func:`worded_verdict`.
        images: Images both arms were evaluated on.
        p_value: Two-sided bootstrap p-value of no difference (unadjusted).
        method: True when both arms have ≥ 2 seeds (a verdict about the method).
        seed_variance: True when the interval holds seed-to-seed variance (some arm has
            ≥ 2 seeds: the pooled estimate).
    """

    metric: str
    reference: ArmSummary
    arm: ArmSummary
    difference: float
    low: float
    high: float
    verdict: str
    images: int
    p_value: float = math.nan
    method: bool = True
    seed_variance: bool = True


def value_range(metric: str) -> tuple[float, float]:
    """The values a metric can take: scores in [0, 1], losses >= 0, curve statistics as
    :mod:`ssl_mt.compare.claims` declares them."""
    if metric in CLAIM_RANGES:
        return CLAIM_RANGES[metric]
    return (0.0, 1.0) if is_score(metric) else (0.0, math.inf)


def _clip(bounds: tuple[float, float], low: float, high: float) -> tuple[float, float]:
    # With 2 seeds the seed part is a t(1) draw: its tails reach past what a metric can be.
    return max(low, bounds[0]), min(high, bounds[1])


def summarise(
    draws: Draws,
    arm: int,
    name: str,
    settings: BootstrapSettings,
    metric: str = "loss",
    pooled_over: Sequence[int] | None = None,
) -> ArmSummary:
    """One arm's value with its interval (seed variance pooled over ``pooled_over``, default
    every arm of ``draws``)."""
    weights = np.zeros(len(draws.per_seed))
    weights[arm] = 1.0
    if pooled_over is not None and arm not in pooled_over:
        raise ValueError(f"arm {arm} is not among the arms pooled over {list(pooled_over)}")
    # The seed part pooled over the arms compared, also where this arm has one seed.
    replicates = draws.replicates(weights, pooled_over)
    low, high = _clip(value_range(metric), *interval(replicates, settings))
    return ArmSummary(
        name=name,
        value=draws.value(arm),
        std=draws.std(arm),
        seeds=len(draws.per_seed[arm]),
        low=low,
        high=high,
    )


def compare_arms(
    arms: Sequence[np.ndarray],
    names: Sequence[str],
    metric: str,
    settings: BootstrapSettings,
    strata: Sequence[np.ndarray] | None = None,
) -> list[Comparison]:
    """Every arm after the first against the first (the reference), on one metric.

    Args:
        arms: Per arm, ingredients ``(S, N, k)`` on the same N images (see :func:`bootstrap`).
        names: Arm names, in the order of ``arms``.
        metric: The metric.
        settings: Bootstrap settings.
        strata: See :func:`bootstrap`.
    """
    return compare_arms_metrics({metric: arms}, names, settings, strata)[metric]


def compare_arms_metrics(
    arms_by_metric: Mapping[str, Sequence[np.ndarray]],
    names: Sequence[str],
    settings: BootstrapSettings,
    strata: Sequence[np.ndarray] | None = None,
) -> dict[str, list[Comparison]]:
    """:func:`compare_arms` for several metrics on the same images (one set of image draws)."""
    if any(len(names) != len(arms) for arms in arms_by_metric.values()):
        raise ValueError(f"{len(names)} names for arms {[len(a) for a in arms_by_metric.values()]}")
    return compare_draws(bootstrap_metrics(arms_by_metric, settings, strata), names, settings)


def compare_draws(
    draws_by_statistic: Mapping[str, Draws], names: Sequence[str], settings: BootstrapSettings
) -> dict[str, list[Comparison]]:
    """Every arm after the first against the first, for each statistic's draws."""
    results = {}
    for metric, draws in draws_by_statistic.items():
        lowest, highest = value_range(metric)
        span = (lowest - highest, highest - lowest)  # what a difference can be
        comparisons = []
        for a in range(1, len(names)):
            pair = [0, a]
            weights = np.zeros(len(names))
            weights[pair] = -1.0, 1.0
            replicates = draws.replicates(weights)
            low, high = _clip(span, *interval(replicates, settings))
            difference = draws.value(a) - draws.value(0)
            method = draws.seeds(0) >= 2 and draws.seeds(a) >= 2
            found = verdict(low, high, metric)
            comparisons.append(
                Comparison(
                    metric=metric,
                    reference=summarise(draws, 0, names[0], settings, metric, pair),
                    arm=summarise(draws, a, names[a], settings, metric, pair),
                    difference=difference,
                    low=low,
                    high=high,
                    verdict=worded_verdict(None if found == NO_DIFFERENCE else found, method),
                    images=draws.images,
                    p_value=p_value(replicates),
                    method=method,
                    seed_variance=draws.covers_seeds(pair),
                )
            )
        results[metric] = comparisons
    return results
