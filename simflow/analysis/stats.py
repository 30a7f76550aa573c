"""The statistics that decide the study's claims: a paired t-test over seeds and Holm's correction.

Variants trained with the same seed share their data order, labels and sampling noise, so a
claim "A beats B" is tested on the per-seed differences ``A(seed) - B(seed)``: the mean
difference, its two-sided Student-t interval and the two-sided paired t-test's p-value
(:func:`paired_t`). Several claims are decided on one study, so the p-values are adjusted by
Holm's step-down procedure (:func:`holm`; Holm 1979, Scand. J. Statist. 6:65-70), which keeps the
family-wise error rate at ``alpha`` whatever the dependence between the claims.
:func:`holm_confidence` gives, per claim, the confidence level of a t-interval that excludes zero
exactly when the Holm-adjusted p-value is below ``alpha``: the interval the verdict reads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as _st

__all__ = ["ALPHA", "PairedTest", "holm", "holm_confidence", "paired_t", "t_interval"]

#: The family-wise error rate of the study's verdicts.
ALPHA = 0.05


@dataclass(frozen=True)
class PairedTest:
    """A paired t-test of per-seed differences. With one pair only ``mean_diff`` is defined
    (the other fields are None): one seed gives a point estimate, never a test."""

    n: int
    mean_diff: float
    std_diff: float | None
    ci_low: float | None
    ci_high: float | None
    p: float | None


def t_interval(diffs: Sequence[float], confidence: float = 1 - ALPHA) -> tuple[float, float]:
    """Two-sided Student-t interval of the mean of ``diffs`` (at least 2 values) at ``confidence``:
    ``mean ± t_{1-(1-confidence)/2, n-1} · s / sqrt(n)``. A zero spread gives the point itself."""
    d = np.asarray(diffs, dtype=float)
    if d.size < 2:
        raise ValueError(f"a t-interval needs at least 2 differences, got {d.size}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    mean, se = float(d.mean()), float(d.std(ddof=1)) / math.sqrt(d.size)
    half = float(_st.t.ppf(1 - (1 - confidence) / 2, d.size - 1)) * se
    return mean - half, mean + half


def paired_t(diffs: Sequence[float], alpha: float = ALPHA) -> PairedTest:
    """The paired test of per-seed differences ``diffs`` (finite values, one per seed).

    ``p`` is the two-sided p-value of ``t = mean / (s / sqrt(n))`` on ``n - 1`` degrees of
    freedom (scipy's ``ttest_1samp`` against 0, i.e. ``ttest_rel`` of the two variants), and
    ``ci_low``/``ci_high`` the ``1 - alpha`` interval of :func:`t_interval`. Differences that are
    all equal have no spread: p is 0 when they are non-zero, 1 when they are zero.
    """
    d = np.asarray(diffs, dtype=float)
    if d.size == 0:
        raise ValueError("paired_t needs at least one difference")
    if not np.isfinite(d).all():
        raise ValueError(f"paired_t needs finite differences, got {d.tolist()}")
    mean = float(d.mean())
    if d.size == 1:
        return PairedTest(1, mean, None, None, None, None)
    std = float(d.std(ddof=1))
    low, high = t_interval(d, 1 - alpha)
    if std == 0.0:
        p = 0.0 if mean != 0.0 else 1.0
    else:
        p = float(_st.t.sf(abs(mean) / (std / math.sqrt(d.size)), d.size - 1) * 2)
    return PairedTest(int(d.size), mean, std, low, high, p)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given.

    With the p-values sorted ``p_(1) <= ... <= p_(m)``, ``adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))``;
    a claim is rejected at family-wise level alpha when its adjusted p-value is below alpha.
    """
    p = np.asarray(pvalues, dtype=float)
    if p.size == 0:
        return []
    if not ((p >= 0) & (p <= 1)).all():
        raise ValueError(f"p-values must lie in [0, 1], got {p.tolist()}")
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted = np.maximum.accumulate(adjusted)
    out = np.empty(m)
    out[order] = adjusted
    return out.tolist()


def holm_confidence(pvalues: Sequence[float], alpha: float = ALPHA) -> list[float]:
    """Per claim, the confidence level ``1 - alpha · p / p_holm`` of its Holm-adjusted interval.

    Holm's procedure multiplies each p-value by a factor ``k = p_holm / p`` (``m - rank + 1``,
    or more where the step-down carries a larger earlier value); the t-interval at level
    ``1 - alpha / k`` excludes zero exactly when ``p_holm < alpha``, so the interval and the
    verdict agree. A p-value of 0 (no spread) takes the factor ``m - rank + 1``.
    """
    p = np.asarray(pvalues, dtype=float)
    adjusted = np.asarray(holm(p))
    m = p.size
    ranks = np.empty(m, dtype=int)
    ranks[np.argsort(p, kind="stable")] = np.arange(m)
    out = []
    for pi, ai, rank in zip(p, adjusted, ranks):
        factor = ai / pi if pi > 0 else float(m - rank)
        out.append(1 - alpha / max(1.0, factor))
    return out
