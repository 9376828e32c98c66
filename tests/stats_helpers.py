"""Goodness-of-fit helpers for the seeded distribution tests (no SciPy needed)."""

from __future__ import annotations

import math
from collections.abc import Mapping


def chi_square_sf(statistic: float, dof: int) -> float:
    """Upper-tail probability of a chi-square statistic (Wilson-Hilferty approximation).

    Accurate to well under 1e-3 absolute for ``dof >= 3``, which is all the tests use
    it for: they compare the result with significance levels of 1e-3 and above.
    """
    if statistic <= 0:
        return 1.0
    k = float(dof)
    z = ((statistic / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


def chi_square_pvalue(counts: Mapping[object, int], probs: Mapping[object, float], *, min_expected: float = 5.0) -> float:
    """Pearson's test that ``counts`` were drawn from ``probs``.

    Cells expected to hold fewer than ``min_expected`` samples are pooled into one
    so the chi-square approximation holds; any count outside the support of
    ``probs`` makes the p-value 0.
    """
    n = sum(counts.values())
    if any(c and probs.get(cell, 0.0) == 0.0 for cell, c in counts.items()):
        return 0.0
    statistic, cells = 0.0, 0
    pooled_p, pooled_c = 0.0, 0
    for cell, p in probs.items():
        expected = n * p
        if expected < min_expected:
            pooled_p += p
            pooled_c += counts.get(cell, 0)
            continue
        statistic += (counts.get(cell, 0) - expected) ** 2 / expected
        cells += 1
    if pooled_p > 0:
        expected = n * pooled_p
        statistic += (pooled_c - expected) ** 2 / expected
        cells += 1
    return chi_square_sf(statistic, cells - 1)
