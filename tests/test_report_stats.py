"""The report's statistics (regdrop.report.stats) against scipy and the textbook formulas,
on hand-made numbers: the cell interval, the paired and the Welch tests, each verdict, the
detectable difference, and a claim that names a row the sweep lacks."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
from scipy import stats as scipy_stats

from regdrop.errors import ConfigError
from regdrop.report.stats import (
    CONTRADICTED,
    HELD,
    INCONCLUSIVE,
    MAX_SEEDS,
    PAIRED,
    TOO_FEW,
    WELCH,
    compare,
    describe,
    detectable_difference,
    seeds_needed,
    verdict,
)

CELL = [78.1, 79.4, 77.2, 80.0, 78.8]


def test_describe_gives_the_student_t_interval_of_the_mean():
    summary = describe(CELL + [None])  # a seed with no value does not count
    n, mean, sd = 5, float(np.mean(CELL)), float(np.std(CELL, ddof=1))
    half = scipy_stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    assert (summary.n, summary.values) == (n, tuple(CELL))
    assert summary.mean == pytest.approx(mean) and summary.sd == pytest.approx(sd)
    assert summary.ci_low == pytest.approx(mean - half)
    assert summary.ci_high == pytest.approx(mean + half)
    # t, not the normal: wider than mean ± 1.96 sd/sqrt(n) at n = 5.
    assert summary.ci_high - summary.ci_low > 2 * 1.96 * sd / math.sqrt(n) * 1.3
    one = describe([0.5])
    assert (one.n, one.mean, one.sd, one.ci_low) == (1, 0.5, None, None)
    assert describe([]).n == 0


def test_a_paired_comparison_is_scipys_ttest_rel_on_the_seeds():
    better = [80.1, 79.0, 81.2, 80.4, 79.9]
    than = [79.5, 78.9, 80.1, 80.0, 79.0]
    result = compare(better, than, paired=True, higher_is_better=True)
    expected = scipy_stats.ttest_rel(better, than)
    diffs = np.subtract(better, than)
    half = scipy_stats.t.ppf(0.975, 4) * diffs.std(ddof=1) / math.sqrt(5)
    assert result.test == PAIRED and result.df == 4
    assert result.p_value == pytest.approx(expected.pvalue)
    assert result.difference == pytest.approx(diffs.mean())
    assert (result.ci_low, result.ci_high) == pytest.approx((diffs.mean() - half,
                                                             diffs.mean() + half))
    assert result.verdict == HELD  # every seed better: the interval is above 0
    # Unpaired, the same numbers are within each other's spread: Welch cannot tell.
    welch = compare(better, than, paired=False, higher_is_better=True)
    assert welch.p_value > result.p_value and welch.verdict == INCONCLUSIVE


def test_a_welch_comparison_is_scipys_ttest_ind_with_unequal_variances():
    better, than = [0.81, 0.84, 0.79, 0.86], [0.70, 0.78, 0.74, 0.69, 0.80, 0.71]
    result = compare(better, than, paired=False, higher_is_better=True)
    expected = scipy_stats.ttest_ind(better, than, equal_var=False)
    va, vb = np.var(better, ddof=1) / 4, np.var(than, ddof=1) / 6
    df = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 5)  # Welch-Satterthwaite
    diff = np.mean(better) - np.mean(than)
    half = scipy_stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert result.test == WELCH and (result.n_better, result.n_than) == (4, 6)
    assert result.p_value == pytest.approx(expected.pvalue)
    assert result.df == pytest.approx(df)
    assert (result.ci_low, result.ci_high) == pytest.approx((diff - half, diff + half))
    assert result.verdict == HELD
    assert expected.pvalue != pytest.approx(scipy_stats.ttest_ind(better, than).pvalue)


def test_each_verdict_follows_the_interval_and_the_papers_direction():
    low_loss, high_loss = [0.30, 0.32, 0.31, 0.29, 0.33], [0.40, 0.41, 0.39, 0.42, 0.40]
    # Loss: lower is better.
    assert compare(low_loss, high_loss, paired=False, higher_is_better=False).verdict == HELD
    assert compare(high_loss, low_loss, paired=False,
                   higher_is_better=False).verdict == CONTRADICTED
    # Accuracy: higher is better, so the same numbers read the other way.
    assert compare(low_loss, high_loss, paired=False,
                   higher_is_better=True).verdict == CONTRADICTED
    noisy = compare([0.30, 0.45, 0.28, 0.41, 0.35], [0.33, 0.40, 0.31, 0.36, 0.38],
                    paired=False, higher_is_better=True)
    assert noisy.ci_low < 0 < noisy.ci_high and noisy.verdict == INCONCLUSIVE
    assert noisy.detectable > abs(noisy.difference)
    assert verdict(0.1, 0.3, higher_is_better=True) == HELD
    assert verdict(-0.3, -0.1, higher_is_better=True) == CONTRADICTED
    assert verdict(-0.1, 0.3, higher_is_better=False) == INCONCLUSIVE
    assert compare([0.5], [0.4, 0.3], paired=False, higher_is_better=True).verdict == TOO_FEW


@pytest.mark.parametrize("n", [3, 5, 10])
def test_the_detectable_difference_has_80_percent_power(n):
    # The power of the two-sided t test at the detectable difference, from the noncentral t
    # distribution, is 0.80; the textbook central-t formula is close (and falls short).
    se, df = 0.7, n - 1
    mdd = detectable_difference(se, df)
    crit = scipy_stats.t.ppf(0.975, df)
    nc = mdd / se
    power = scipy_stats.nct.sf(crit, df, nc) + scipy_stats.nct.cdf(-crit, df, nc)
    assert power == pytest.approx(0.80, abs=1e-6)
    textbook = (crit + scipy_stats.t.ppf(0.80, df)) * se
    assert textbook <= mdd < 1.1 * textbook
    assert detectable_difference(se, df) > detectable_difference(se, df + 10)
    # The paired comparison reports it on its own standard error of the differences.
    a = [1.0, 2.0, 3.0, 4.0, 5.5][:n] + [6.0] * (n - 5)
    b = [x - d for x, d in zip(a, [0.1, -0.2, 0.3, 0.0, 0.1] * 2, strict=False)]
    result = compare(a, b, paired=True, higher_is_better=True)
    diffs = np.subtract(a, b)
    assert result.detectable == pytest.approx(
        detectable_difference(statistics.stdev(diffs) / math.sqrt(n), n - 1))


@pytest.mark.parametrize("difference, spread", [(0.5, 1.0), (1.2, 1.0), (0.3, 0.4)])
def test_the_seeds_needed_find_the_observed_difference_with_80_percent_power(difference, spread):
    """At the seeds `seeds_needed` names, simulated paired runs whose true difference and
    spread are the observed ones are found significant at least 80% of the time, and with
    one seed fewer less often (4,000 draws each: the binomial standard error is 0.006, the
    tolerance 0.02 over three of them)."""
    n = seeds_needed(difference, spread, paired=True)
    assert 2 < n < MAX_SEEDS
    rng = np.random.default_rng(0)

    def power(seeds: int) -> float:
        diffs = rng.normal(difference, spread, size=(4000, seeds))
        return float(np.mean(scipy_stats.ttest_1samp(diffs, 0.0, axis=1).pvalue < 0.05))

    assert power(n) > 0.80 - 0.02
    assert detectable_difference(spread / math.sqrt(n - 1), n - 2) > difference
    assert power(n - 1) < 0.80 + 0.02


def test_seeds_needed_is_none_without_a_difference_and_capped_when_hopeless():
    assert seeds_needed(0.0, 1.0, paired=True) is None
    assert seeds_needed(0.5, 0.0, paired=False) is None
    assert seeds_needed(1e-4, 10.0, paired=True) == MAX_SEEDS + 1
    # Welch: two rows of n seeds each, df 2n - 2, spread sqrt(var_a + var_b).
    n = seeds_needed(1.0, math.sqrt(2.0), paired=False)
    assert detectable_difference(math.sqrt(2.0 / n), 2 * n - 2) <= 1.0
    assert detectable_difference(math.sqrt(2.0 / (n - 1)), 2 * n - 4) > 1.0
    # compare() reports it for an inconclusive claim.
    result = compare([78.1, 79.4, 77.2], [78.0, 79.0, 77.6], paired=True, higher_is_better=True)
    assert result.verdict == INCONCLUSIVE and result.seeds_needed is not None


def test_a_claim_naming_a_row_the_sweep_lacks_is_a_config_error(tmp_path):
    from regdrop.report.runs import load_jobs
    from regdrop.report.table import TableSpec, build_layout, check_labels
    from tests.test_report import config_of, finished_job

    for seed, method in ((0, "standard"), (0, "gyro")):
        finished_job(tmp_path / f"{method}{seed}", [f"dropout={method}", f"seed={seed}"],
                     config_of(method, 0.5, seed), 0.5)
    jobs = load_jobs([tmp_path])
    section = {"rows": ["dropout.name"], "baseline": "standard",
               "claims": [{"better": "gyro", "than": "standard"},
                          {"better": "gyro / 256 / 16", "than": "standard"}]}
    with pytest.raises(ConfigError) as err:
        check_labels(build_layout(jobs, TableSpec.from_section(section)))
    assert err.value.key == "table.claims[1].better"
    assert "'gyro / 256 / 16' is not a row" in str(err.value) and "'standard'" in str(err.value)
    section["claims"] = section["claims"][:1]
    check_labels(build_layout(jobs, TableSpec.from_section(section)))
    section["baseline"] = "none"
    with pytest.raises(ConfigError, match="table.baseline"):
        check_labels(build_layout(jobs, TableSpec.from_section(section)))
