"""Differences between arms with their uncertainty, from per-image evaluation records.

Every metric is a ratio of sums over images of per-image *ingredients*
(:mod:`ssl_mt.compare.ingredients`), so a bootstrap replicate is a weighted sum: image
counts (B, N) @ ingredients (N, k), one matrix product per seed.

Two sources of uncertainty, both in the interval:

- **images**: the validation set is a sample of images. Every replicate draws image counts
  once and applies them to every arm and seed (a *paired* bootstrap: the arms are compared
  on the same resampled images, so what an image's difficulty adds to both cancels out);
- **seeds**: each arm is a sample of training runs. With several seeds per arm, the spread
  of the per-seed metrics minus what image noise alone explains is each arm's variance
  between runs (:func:`between_seed_variance`; resampling seeds on top of images would count
  the image noise twice). Each replicate adds a zero-mean Student-t draw scaled to the
  variance of the seed means, with Welch–Satterthwaite degrees of freedom: with 3 seeds the
  between-run variance is known only roughly, and a normal draw would be too narrow.

The interval is the percentile interval of the replicates. The verdict reads the interval
with the metric's direction: never "better" or "worse" when the interval contains 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ssl_mt.compare.ingredients import GLOBAL_LOSS, metric_value

BETTER = "better"
WORSE = "worse"
NO_DIFFERENCE = "no detectable difference"
LOWER_IS_BETTER = frozenset({"loss", GLOBAL_LOSS})
# Bootstrap image counts are built in blocks of at most this many (replicate, image) cells,
# so memory stays flat whatever the size of the validation set.
_BLOCK_CELLS = 4_000_000


def is_score(metric: str) -> bool:
    """True when higher is better (everything but the loss)."""
    return metric not in LOWER_IS_BETTER


@dataclass(frozen=True)
class BootstrapSettings:
    """How intervals are computed (``conf/compare.yaml``, overridable on the command line).

    Attributes:
        iterations: Bootstrap replicates.
        seed: Seed of the random generator; the same seed gives the same intervals.
        confidence: Coverage of the intervals (0.95: 95% intervals).
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


# -- bootstrap --------------------------------------------------------------------------------------
def image_counts(rng: np.random.Generator, replicates: int, n: int) -> np.ndarray:
    """How often each of ``n`` images is drawn in each replicate: (replicates, n) floats.

    Sampling ``n`` images with replacement, as integer indices counted with one
    ``bincount`` (several times faster than ``Generator.multinomial``).
    """
    picks = rng.integers(0, n, size=(replicates, n))
    picks += np.arange(replicates)[:, None] * n
    return np.bincount(picks.ravel(), minlength=replicates * n).reshape(replicates, n).astype(float)


def between_seed_variance(per_seed: np.ndarray, replicated: np.ndarray) -> float:
    """The variance between training runs of one arm, net of each run's image noise.

    The spread ``s²`` of the per-seed metrics (all on the same images) is the variance
    between runs plus each run's own noise over the images, which the image bootstrap already
    carries: ``v``, the replicated variance of a seed's deviation from the mean over seeds
    (times ``S / (S − 1)``). Resampling seeds on top of images would count ``v`` twice.

    Args:
        per_seed: (S,) each seed's metric on all images.
        replicated: (B, S) each seed's metric in every image replicate.

    Returns:
        ``max(s² − v, 0)``; 0 with a single seed (nothing to estimate it from).
    """
    seeds = len(per_seed)
    if seeds < 2:
        return 0.0
    spread = float(np.var(per_seed, ddof=1))
    deviations = replicated - replicated.mean(axis=1, keepdims=True)
    image_noise = float(deviations.var(axis=0, ddof=1).mean()) * seeds / (seeds - 1)
    return max(spread - image_noise, 0.0)


@dataclass(frozen=True)
class Draws:
    """Point estimates and bootstrap replicates of a metric for several arms.

    Attributes:
        per_seed: Per arm, the metric of every seed on all images: (S_a,) each.
        image_replicates: (B, A) each arm's mean over seeds in every (paired) image replicate.
        between: (A,) each arm's variance between runs (:func:`between_seed_variance`).
        images: Number of images (the same for every arm).
        seed: Seed of the generator of the seed-variance draws.
    """

    per_seed: list[np.ndarray]
    image_replicates: np.ndarray
    between: np.ndarray
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

    def replicates(self, weights: Sequence[float]) -> np.ndarray:
        """Replicates of ``Σ weights[a] · arm a``, images and seeds: (B,).

        The image part is the paired bootstrap; the seed part a zero-mean Student-t draw with
        the variance ``Σ w_a² · between_a / S_a`` of the seed means and the
        Welch–Satterthwaite degrees of freedom of those components (``S_a − 1`` each): with
        3 seeds the between-run variance is known only roughly, and a normal draw (or a
        plain resampling of 3 seeds) would make the interval too narrow.
        """
        weights = np.asarray(weights, dtype=float)
        image = self.image_replicates @ weights
        parts = np.array(
            [
                w * w * b / self.seeds(a)
                for a, (w, b) in enumerate(zip(weights, self.between, strict=True))
            ]
        )
        variance = float(parts.sum())
        if variance <= 0.0:
            return image
        dof = [self.seeds(a) - 1 for a in range(len(parts))]
        df = variance**2 / sum(p * p / d for p, d in zip(parts, dof, strict=True) if p > 0)
        rng = np.random.default_rng([self.seed, 1])
        # se · T(df): the interval of a t-test on the seed means, added to the image part.
        return image + math.sqrt(variance) * rng.standard_t(df, size=len(image))


def bootstrap(arms: Sequence[np.ndarray], metric: str, settings: BootstrapSettings) -> Draws:
    """Paired bootstrap over images plus the between-run variance of every arm.

    Args:
        arms: Per arm, the ingredients ``(S, N, k)``: S seeds (runs), N images (the same
            images in the same order for every arm and seed), k ingredients of ``metric``.
        metric: The metric (see :func:`metric_value`).
        settings: Replicates, random seed.
    """
    return bootstrap_metrics({metric: arms}, settings)[metric]


def bootstrap_metrics(
    arms_by_metric: Mapping[str, Sequence[np.ndarray]], settings: BootstrapSettings
) -> dict[str, Draws]:
    """:func:`bootstrap` of several metrics on the same images, with the same image draws
    (drawn once: at 30k images they cost more than the sums). Each metric's draws equal
    those of :func:`bootstrap` of that metric alone."""
    shapes = [x.shape for arms in arms_by_metric.values() for x in arms]
    if not shapes or any(not arms for arms in arms_by_metric.values()):
        raise ValueError("no arm to bootstrap")
    n = shapes[0][1]
    if any(len(shape) != 3 or shape[1] != n for shape in shapes):
        raise ValueError(f"every arm needs (seeds, {n} images, k) ingredients: {shapes}")
    if n == 0:
        raise ValueError("no image to bootstrap over")
    rng = np.random.default_rng(settings.seed)
    iterations = settings.iterations
    replicated = {
        metric: [np.empty((iterations, x.shape[0])) for x in arms]
        for metric, arms in arms_by_metric.items()
    }
    block = max(1, _BLOCK_CELLS // n)
    for start in range(0, iterations, block):
        counts = image_counts(rng, min(block, iterations - start), n)  # the same for all arms
        for metric, arms in arms_by_metric.items():
            for values, x in zip(replicated[metric], arms, strict=True):
                seeds, _, k = x.shape
                # One matrix product for all seeds: (b, N) @ (N, S·k).
                sums = counts @ x.transpose(1, 0, 2).reshape(n, seeds * k)
                values[start : start + len(counts)] = metric_value(
                    metric, sums.reshape(len(counts), seeds, k)
                )
    draws = {}
    for metric, arms in arms_by_metric.items():
        per_seed = [metric_value(metric, x.sum(axis=1)) for x in arms]
        values = replicated[metric]
        draws[metric] = Draws(
            per_seed=per_seed,
            image_replicates=np.stack([v.mean(axis=1) for v in values], axis=1),
            between=np.array(
                [between_seed_variance(p, v) for p, v in zip(per_seed, values, strict=True)]
            ),
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


def verdict(low: float, high: float, metric: str) -> str:
    """``better`` / ``worse`` / ``no detectable difference`` for an interval of B − A.

    ``better`` needs the whole interval on the good side of 0 (above for a score, below for a
    loss); an interval that contains 0 is never a difference.
    """
    if math.isnan(low) or math.isnan(high):
        return NO_DIFFERENCE
    if low > 0:
        return BETTER if is_score(metric) else WORSE
    if high < 0:
        return WORSE if is_score(metric) else BETTER
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
        verdict: See :func:`verdict`.
        images: Images both arms were evaluated on.
    """

    metric: str
    reference: ArmSummary
    arm: ArmSummary
    difference: float
    low: float
    high: float
    verdict: str
    images: int


def value_range(metric: str) -> tuple[float, float]:
    """The values a metric can take: scores in [0, 1], losses >= 0."""
    return (0.0, 1.0) if is_score(metric) else (0.0, math.inf)


def _clip(bounds: tuple[float, float], low: float, high: float) -> tuple[float, float]:
    # With 2 seeds the seed part is a t(1) draw: its tails reach past what a metric can be.
    return max(low, bounds[0]), min(high, bounds[1])


def summarise(
    draws: Draws, arm: int, name: str, settings: BootstrapSettings, metric: str = "loss"
) -> ArmSummary:
    weights = np.zeros(len(draws.per_seed))
    weights[arm] = 1.0
    low, high = _clip(value_range(metric), *interval(draws.replicates(weights), settings))
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
) -> list[Comparison]:
    """Every arm after the first against the first (the reference), on one metric.

    Args:
        arms: Per arm, ingredients ``(S, N, k)`` on the same N images (see :func:`bootstrap`).
        names: Arm names, in the order of ``arms``.
        metric: The metric.
        settings: Bootstrap settings.
    """
    return compare_arms_metrics({metric: arms}, names, settings)[metric]


def compare_arms_metrics(
    arms_by_metric: Mapping[str, Sequence[np.ndarray]],
    names: Sequence[str],
    settings: BootstrapSettings,
) -> dict[str, list[Comparison]]:
    """:func:`compare_arms` for several metrics on the same images (one set of image draws)."""
    if any(len(names) != len(arms) for arms in arms_by_metric.values()):
        raise ValueError(f"{len(names)} names for arms {[len(a) for a in arms_by_metric.values()]}")
    results = {}
    for metric, draws in bootstrap_metrics(arms_by_metric, settings).items():
        reference = summarise(draws, 0, names[0], settings, metric)
        lowest, highest = value_range(metric)
        span = (lowest - highest, highest - lowest)  # what a difference can be
        comparisons = []
        for a in range(1, len(names)):
            weights = np.zeros(len(names))
            weights[[0, a]] = -1.0, 1.0
            low, high = _clip(span, *interval(draws.replicates(weights), settings))
            comparisons.append(
                Comparison(
                    metric=metric,
                    reference=reference,
                    arm=summarise(draws, a, names[a], settings, metric),
                    difference=draws.value(a) - draws.value(0),
                    low=low,
                    high=high,
                    verdict=verdict(low, high, metric),
                    images=draws.images,
                )
            )
        results[metric] = comparisons
    return results
