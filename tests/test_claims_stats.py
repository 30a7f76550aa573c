"""Known-answer tests of simflow.analysis.stats: the paired t-test, its interval, Holm's
adjustment and the Holm-corrected interval's level (against scipy and hand-computed values)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from simflow.analysis.stats import holm, holm_confidence, paired_t, t_interval


def test_paired_t_known_answer_by_hand():
    # d = 1, 2, 3: mean 2, s = 1, t = 2 / (1 / sqrt 3) = 2 sqrt 3 on 2 df. For 2 df the
    # two-sided p is 1 - t / sqrt(t^2 + 2) = 1 - sqrt(12 / 14); t_{0.975, 2} = 4.302653.
    r = paired_t([1.0, 2.0, 3.0])
    assert r.n == 3 and r.mean_diff == 2.0 and r.std_diff == pytest.approx(1.0)
    assert r.p == pytest.approx(1 - math.sqrt(12 / 14), rel=1e-12)
    half = 4.302652729749464 / math.sqrt(3)
    assert (r.ci_low, r.ci_high) == (pytest.approx(2 - half), pytest.approx(2 + half))


def test_paired_t_matches_scipy_ttest_rel():
    rng = np.random.default_rng(3)
    for n in (2, 3, 5, 8):
        a, b = rng.normal(0.0, 1.0, n), rng.normal(0.3, 1.0, n)
        r = paired_t(a - b)
        ref = stats.ttest_rel(a, b)
        assert r.p == pytest.approx(ref.pvalue, rel=1e-10)
        lo, hi = ref.confidence_interval(0.95)
        assert (r.ci_low, r.ci_high) == (pytest.approx(lo), pytest.approx(hi))
        assert t_interval(a - b, 0.99) == (pytest.approx(ref.confidence_interval(0.99)[0]),
                                           pytest.approx(ref.confidence_interval(0.99)[1]))


def test_paired_t_edge_cases():
    one = paired_t([0.7])
    assert one.n == 1 and one.mean_diff == 0.7 and one.p is None and one.ci_low is None
    same = paired_t([0.5, 0.5, 0.5])  # no spread: the difference is exact
    assert same.p == 0.0 and same.ci_low == same.ci_high == 0.5
    assert paired_t([0.0, 0.0]).p == 1.0
    with pytest.raises(ValueError, match="finite"):
        paired_t([1.0, float("nan")])
    with pytest.raises(ValueError, match="at least one"):
        paired_t([])
    with pytest.raises(ValueError, match="at least 2"):
        t_interval([1.0])


def test_holm_known_answer():
    # sorted 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> 0.06, monotone)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([0.02]) == [0.02] and holm([]) == []
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([0.1, 1.5])


def test_holm_controls_the_family_wise_error_rate():
    # m = 5 true nulls, independent uniform p-values: P(any adjusted p < 0.05) <= 0.05.
    rng = np.random.default_rng(0)
    hits = sum(min(holm(rng.uniform(size=5))) < 0.05 for _ in range(4000))
    assert hits / 4000 < 0.06
    # ... while the raw p-values reject far more often (1 - 0.95^5 = 0.23).
    raw = sum(min(rng.uniform(size=5)) < 0.05 for _ in range(4000))
    assert raw / 4000 > 0.2


def test_holm_interval_excludes_zero_exactly_when_the_adjusted_p_is_below_alpha():
    rng = np.random.default_rng(1)
    for _ in range(200):
        samples = [rng.normal(rng.normal(0, 0.8), 1.0, size=4) for _ in range(4)]
        p = [paired_t(d).p for d in samples]
        adjusted, levels = holm(p), holm_confidence(p)
        for d, pa, level in zip(samples, adjusted, levels, strict=True):
            lo, hi = t_interval(d, level)
            assert (lo > 0 or hi < 0) == (pa < 0.05)
    # the level of the smallest p of m is 1 - alpha / m (Bonferroni's for that step)
    assert holm_confidence([0.001, 0.2, 0.3])[0] == pytest.approx(1 - 0.05 / 3)
