"""Two-sample tests for the engine tests that compare sampled outputs (no scipy in the venv).

:func:`two_sample_chi2` asks whether two samples of discrete outcomes (token ids, token
sequences) come from one distribution: Pearson's chi-square on the 2 x C contingency table,
with the categories too rare for the chi-square approximation pooled into one.
:func:`chi2_sf` is the chi-square distribution's survival function for an integer number of
degrees of freedom, in closed form (a finite sum of Poisson terms for even df, ``erfc`` plus
such a sum for odd df).
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for X chi-square distributed with ``df`` (an int >= 1) degrees of freedom."""
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"df: expected an int >= 1, got {df!r}")
    if x <= 0:
        return 1.0
    h = x / 2
    if df % 2 == 0:  # Q(df/2, h) = exp(-h) * sum_{i < df/2} h^i / i!
        term = total = 1.0
        for i in range(1, df // 2):
            term *= h / i
            total += term
        return min(1.0, math.exp(-h) * total)
    # Q(df/2, h) = erfc(sqrt h) + exp(-h) * sum_{i < (df-1)/2} h^(i+1/2) / Gamma(i+3/2)
    total = math.erfc(math.sqrt(h))
    term = math.sqrt(h) * math.exp(-h) / math.gamma(1.5)
    for i in range((df - 1) // 2):
        total += term
        term *= h / (i + 1.5)
    return min(1.0, total)


POOLED = "pooled"  # the label of the rare categories pooled into one


@dataclass(frozen=True, slots=True)
class ChiSquare:
    statistic: float
    df: int  # categories after pooling, minus one; 0: a single category, nothing to compare
    p_value: float
    table: tuple[tuple[Hashable, int, int], ...]  # (category, count in a, count in b), most frequent first


def two_sample_chi2(a: Sequence[Hashable], b: Sequence[Hashable], *, min_expected: float = 5.0) -> ChiSquare:
    """Pearson's chi-square test that samples ``a`` and ``b`` share one distribution.

    A category is kept when its expected count in the smaller sample reaches ``min_expected``;
    the others are pooled into one (:data:`POOLED`), itself merged into the least frequent kept
    category when it falls short too. A single category left (both samples constant and
    equal, say) gives p = 1."""
    if not a or not b:
        raise ValueError(f"two_sample_chi2: expected two non-empty samples, got {len(a)} and {len(b)} outcomes")
    count_a, count_b = Counter(a), Counter(b)
    n_a, n_b = len(a), len(b)
    n = n_a + n_b
    share = min(n_a, n_b) / n  # a category's expected count in the smaller sample, per outcome
    by_count = sorted(set(count_a) | set(count_b), key=lambda c: count_a[c] + count_b[c], reverse=True)
    rows = [(c, count_a[c], count_b[c]) for c in by_count if (count_a[c] + count_b[c]) * share >= min_expected]
    pooled = (n_a - sum(r[1] for r in rows), n_b - sum(r[2] for r in rows))
    if sum(pooled) * share >= min_expected or (sum(pooled) and not rows):
        rows.append((POOLED, *pooled))
    elif sum(pooled):
        c, in_a, in_b = rows.pop()
        rows.append((c, in_a + pooled[0], in_b + pooled[1]))
    if len(rows) < 2:
        return ChiSquare(0.0, 0, 1.0, tuple(rows))
    statistic = 0.0
    for _, in_a, in_b in rows:
        total = in_a + in_b
        expected_a, expected_b = total * n_a / n, total * n_b / n
        statistic += (in_a - expected_a) ** 2 / expected_a + (in_b - expected_b) ** 2 / expected_b
    df = len(rows) - 1
    return ChiSquare(statistic, df, chi2_sf(statistic, df), tuple(rows))
