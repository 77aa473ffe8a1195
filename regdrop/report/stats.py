"""The report's statistics: pure functions on lists of numbers, all distributions scipy's.

`describe` gives a cell's n, mean, sample standard deviation and 95% Student-t interval;
`compare` gives a claim's difference of means, its 95% interval and p-value (paired by seed
or Welch) and the smallest difference the seeds could have detected; `verdict` reads the
interval in the direction the paper states. docs/report.md states every formula.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from scipy import optimize
from scipy import stats as scipy_stats

CONFIDENCE = 0.95
ALPHA = 1.0 - CONFIDENCE  # two-sided test level
POWER = 0.80  # for the minimal detectable difference

HELD = "held"
CONTRADICTED = "contradicted"
INCONCLUSIVE = "inconclusive"
TOO_FEW = "too few seeds"  # fewer than 2 finished seeds in a row (or pairs): no interval
VERDICTS = (HELD, CONTRADICTED, INCONCLUSIVE, TOO_FEW)

PAIRED = "paired t (by seed)"
WELCH = "Welch t"


@dataclass(frozen=True)
class Summary:
    """n, mean, sample standard deviation and 95% Student-t interval of the mean."""

    n: int
    mean: float | None
    sd: float | None
    ci_low: float | None
    ci_high: float | None
    values: tuple[float, ...]

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["values"] = list(self.values)
        return out


def _finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def describe(values: Sequence[float | None]) -> Summary:
    """`Summary` of the finite ``values``: the interval is mean ± t(0.975, n-1) · sd/√n
    (scipy's t distribution); sd and interval are None below two values."""
    numbers = _finite(values)
    n = len(numbers)
    if n == 0:
        return Summary(0, None, None, None, None, ())
    mean = statistics.fmean(numbers)
    if n == 1:
        return Summary(1, mean, None, None, None, tuple(numbers))
    sd = statistics.stdev(numbers)
    if sd == 0:
        low = high = mean
    else:
        low, high = scipy_stats.t.interval(CONFIDENCE, n - 1, loc=mean, scale=sd / math.sqrt(n))
    return Summary(n, mean, sd, float(low), float(high), tuple(numbers))


@dataclass(frozen=True)
class Comparison:
    """``better`` - ``than``: the difference of means, its 95% interval, the p-value of the
    two-sided test, the test, its degrees of freedom, the minimal detectable difference
    (80% power, alpha 0.05), the seeds per row that would detect the observed difference
    (`seeds_needed`) and the verdict in the paper's direction."""

    difference: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    test: str
    df: float | None
    n_better: int
    n_than: int
    detectable: float | None
    verdict: str
    seeds_needed: int | None = None


    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def detectable_difference(se: float, df: float, *, alpha: float = ALPHA,
                          power: float = POWER) -> float:
    """The smallest true difference a two-sided t test at level ``alpha`` finds with
    probability ``power``: ``delta · se``, where se is the standard error of the difference
    and delta the noncentrality at which the test's power (scipy's noncentral t, ``nct``)
    is ``power``. Close to the textbook (t(1 - alpha/2, df) + t(power, df)) · se, which
    starts the search; exact where that one falls short at few degrees of freedom."""
    crit = scipy_stats.t.ppf(1 - alpha / 2, df)

    def shortfall(delta: float) -> float:
        # The far tail (a significant difference the wrong way) is tiny; nct's cdf there can
        # come back NaN, which counts as 0.
        wrong_way = float(scipy_stats.nct.cdf(-crit, df, delta))
        return float(scipy_stats.nct.sf(crit, df, delta)) + \
            (wrong_way if math.isfinite(wrong_way) else 0.0) - power

    guess = crit + scipy_stats.t.ppf(power, df)
    delta = optimize.brentq(shortfall, 0.5 * guess, 1.5 * guess + 1.0)
    return float(delta * se)


MAX_SEEDS = 1000  # `seeds_needed` searches no further: "more than 1,000"


def seeds_needed(difference: float | None, spread: float, *, paired: bool) -> int | None:
    """The seeds per row at which the observed ``difference`` (taken as the true one, with
    the observed spread) is found at 80% power: the smallest n whose
    `detectable_difference` is at most ``|difference|``. ``spread``: the standard deviation
    of the per-seed differences (paired), or sqrt(var_better + var_than) (Welch, equal n per
    row, df 2n - 2). None when there is no difference or no spread to size it by; MAX_SEEDS
    + 1 when even MAX_SEEDS seeds would not do. A planning figure, not a promise: the
    observed difference is itself uncertain."""
    if difference is None or difference == 0 or not spread > 0:
        return None

    def enough(n: int) -> bool:
        return detectable_difference(spread / math.sqrt(n), n - 1 if paired else 2 * n - 2) <= abs(difference)

    if not enough(MAX_SEEDS):
        return MAX_SEEDS + 1
    low, high = 2, MAX_SEEDS  # enough(high) holds; find the smallest such n
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if enough(middle) else (middle + 1, high)
    return low


def verdict(ci_low: float | None, ci_high: float | None, *, higher_is_better: bool) -> str:
    """held: the interval of better - than excludes 0 in the paper's direction (above 0
    when higher is better, below when lower is); contradicted: it excludes 0 the other
    way; inconclusive: it contains 0; too few seeds: no interval."""
    if ci_low is None or ci_high is None:
        return TOO_FEW
    if ci_low > 0:
        return HELD if higher_is_better else CONTRADICTED
    if ci_high < 0:
        return CONTRADICTED if higher_is_better else HELD
    return INCONCLUSIVE


def compare(better: Sequence[float | None], than: Sequence[float | None], *, paired: bool,
            higher_is_better: bool) -> Comparison:
    """Compare two rows' per-seed values. ``paired``: ``better[i]`` and ``than[i]`` share a
    seed (same initial weights and data order): a paired t test on the differences (scipy
    ``ttest_rel``); otherwise Welch's unequal-variance t test (``ttest_ind``,
    ``equal_var=False``). The interval is scipy's ``confidence_interval(0.95)``."""
    if paired:
        pairs = [(a, b) for a, b in zip(better, than, strict=True)
                 if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
        a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    else:
        a, b = _finite(better), _finite(than)
    test = PAIRED if paired else WELCH
    difference = statistics.fmean(a) - statistics.fmean(b) if a and b else None
    if len(a) < 2 or len(b) < 2:
        return Comparison(difference, None, None, None, test, None, len(a), len(b), None,
                          TOO_FEW)
    if paired:
        diffs = [x - y for x, y in zip(a, b, strict=True)]
        sd = statistics.stdev(diffs)
        df: float = len(diffs) - 1
        se = sd / math.sqrt(len(diffs))
        if sd == 0:  # every seed gave the same difference: no spread to test against
            p = 1.0 if difference == 0 else 0.0
            low = high = difference
        else:
            result = scipy_stats.ttest_rel(a, b)
            p = float(result.pvalue)
            low, high = result.confidence_interval(CONFIDENCE)
    else:
        var_a, var_b = statistics.variance(a), statistics.variance(b)
        se = math.sqrt(var_a / len(a) + var_b / len(b))
        if se == 0:
            p = 1.0 if difference == 0 else 0.0
            low = high = difference
            df = len(a) + len(b) - 2
        else:
            result = scipy_stats.ttest_ind(a, b, equal_var=False)
            p = float(result.pvalue)
            df = float(result.df)
            low, high = result.confidence_interval(CONFIDENCE)
    low, high = float(low), float(high)
    spread = sd if paired else math.sqrt(var_a + var_b)
    return Comparison(difference, low, high, p, test, float(df), len(a), len(b),
                      detectable_difference(se, df),
                      verdict(low, high, higher_is_better=higher_is_better),
                      seeds_needed(difference, spread, paired=paired))
