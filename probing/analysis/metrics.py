"""Separation and shift metrics on score vectors, vectorised over bootstrap resamples.

Conventions (documented values for degenerate input, see docs/analysis.md):
- AUROC is P(harmful score > benign score) + 0.5 P(tie), harmful the positive class; all-equal
  scores give 0.5.
- d' = (mu_h - mu_b) / sqrt((var_h + var_b) / 2) with sample variances (ddof=1). When both
  classes have zero variance, d' is 0 if the means are equal and +-inf otherwise.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from .folds import group_key


def auroc(harmful: np.ndarray, benign: np.ndarray) -> np.ndarray:
    """AUROC of harmful vs benign scores along the last axis: ``[..., n_h], [..., n_b] -> [...]``."""
    harmful, benign = np.asarray(harmful, float), np.asarray(benign, float)
    n_h, n_b = harmful.shape[-1], benign.shape[-1]
    ranks = rankdata(np.concatenate([harmful, benign], -1), axis=-1)  # ties get average ranks
    u = ranks[..., :n_h].sum(-1) - n_h * (n_h + 1) / 2
    return u / (n_h * n_b)


def d_prime(harmful: np.ndarray, benign: np.ndarray) -> np.ndarray:
    """Sensitivity index along the last axis: ``[..., n_h], [..., n_b] -> [...]``."""
    harmful, benign = np.asarray(harmful, float), np.asarray(benign, float)
    diff = harmful.mean(-1) - benign.mean(-1)
    pooled = np.sqrt((harmful.var(-1, ddof=1) + benign.var(-1, ddof=1)) / 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(pooled > 0, diff / np.where(pooled > 0, pooled, 1.0),
                       np.where(diff == 0, 0.0, np.sign(diff) * np.inf))
    return out


def pooled_sd(harmful: np.ndarray, benign: np.ndarray) -> np.ndarray:
    """sqrt((var_h + var_b) / 2), the unit in which shifts are expressed so layers compare."""
    return np.sqrt((np.asarray(harmful, float).var(-1, ddof=1) + np.asarray(benign, float).var(-1, ddof=1)) / 2)


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap samples (non-finite samples ignored)."""
    samples = np.asarray(samples, float)
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    lo, hi = np.quantile(finite, [alpha, 1 - alpha])
    return float(lo), float(hi)


def stratified_indices(n_h: int, n_b: int, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap resamples of query indices within each class: ``[n_boot, n_h]``, ``[n_boot, n_b]``.

    Resampling within class keeps both classes present in every resample, so every figure is
    defined; pairing is kept because a query's baseline and defended scores share its index.
    """
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_h, (n_boot, n_h)), rng.integers(0, n_b, (n_boot, n_b))


def refusal_rate(p_refuse, threshold: float = 0.5) -> np.ndarray:
    """Share of queries counted as refused, ``p_refuse > threshold``, along the last axis.

    The one definition of a refusal rate in mechprobe: ``[..., n] -> [...]`` (NaN for n = 0). The
    same rule holds on the margin scale, ``margin > logit(threshold)``; `compare` and
    `safety_helpfulness` pass margins and that cut (float64), which does not saturate."""
    p = np.asarray(p_refuse, float)
    if p.shape[-1] == 0:
        return np.full(p.shape[:-1], np.nan) if p.ndim > 1 else np.float64(np.nan)
    return (p > threshold).mean(-1)


def compliance_rate(p_refuse, threshold: float = 0.5) -> np.ndarray:
    """Share of queries counted as answered, ``p_refuse <= threshold``: the complement of
    `refusal_rate` (computed directly, so it is exact rather than ``1 - rate``; margins and a
    margin cut work alike)."""
    p = np.asarray(p_refuse, float)
    if p.shape[-1] == 0:
        return np.full(p.shape[:-1], np.nan) if p.ndim > 1 else np.float64(np.nan)
    return (p <= threshold).mean(-1)


def criterion(harmful: np.ndarray, benign: np.ndarray, threshold: float = 0.0) -> np.ndarray:
    """Signal-detection criterion c of the rule "refuse when score > threshold", along the last axis.

    Equal-variance Gaussian model with the d' unit: ``c = (threshold - (mu_h + mu_b) / 2) / pooled``,
    i.e. ``-(z(hit) + z(false alarm)) / 2`` with hit = refusal of harmful, false alarm = refusal of
    benign. c > 0: conservative (refuses less than a neutral observer), c < 0: liberal. Zero
    pooled SD gives 0 when the threshold sits at the midpoint and +-inf otherwise."""
    harmful, benign = np.asarray(harmful, float), np.asarray(benign, float)
    off = threshold - (harmful.mean(-1) + benign.mean(-1)) / 2
    pooled = pooled_sd(harmful, benign)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(pooled > 0, off / np.where(pooled > 0, pooled, 1.0),
                        np.where(off == 0, 0.0, np.sign(off) * np.inf))


def hodges_lehmann(x: np.ndarray) -> np.ndarray:
    """One-sample Hodges-Lehmann estimate along the last axis: the median of the Walsh averages
    ``(x_i + x_j) / 2, i <= j``. A rank-based centre that ignores how far out the tails reach."""
    x = np.asarray(x, float)
    i, j = np.triu_indices(x.shape[-1])
    return np.median((x[..., i] + x[..., j]) / 2, axis=-1)


def hodges_lehmann_shift(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Two-sample Hodges-Lehmann shift along the last axis: the median of all ``x_i - y_j``."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    diff = x[..., :, None] - y[..., None, :]
    return np.median(diff.reshape(*diff.shape[:-2], -1), axis=-1)


def design_effect(values, groups) -> tuple[float, float, int, float]:
    """How much correlated members of a group inflate the variance of a mean of ``values`` [N]:
    ``(deff, icc, n_groups, p_value)``, deff = 1 + (sum m_g^2 / N - 1) * max(icc, 0) (Kish), icc the one-way
    ANOVA intraclass correlation with the group-size correction for unequal groups (Donner 1986):
    (MSB - MSW) / (MSB + (m0 - 1) MSW), m0 = (N - sum m_g^2 / N) / (G - 1). ``groups`` [N]: each
    value's group (None: a group of its own). A mean's standard error computed as if the N values
    were independent is sqrt(deff) times too small. ``p_value``: the one-way ANOVA F test of
    icc = 0 (MSB / MSW on G - 1 and N - G df), so a caller can tell a real correlation from the
    estimate's noise (at 20 groups of 2-3 the icc's SD is about 0.15). deff 1.0 and p 1.0 when
    every group has one member, when there are fewer than 3 groups, or when all values are equal."""
    from scipy.stats import f as f_dist

    x = np.asarray(values, float)
    keys = [group_key(str(i), g) for i, g in enumerate(groups)]  # the folds' keys, as `compare`
    order: dict = {}
    codes = np.array([order.setdefault(k, len(order)) for k in keys])
    n, g = len(x), len(order)
    sizes = np.bincount(codes, minlength=g).astype(float)
    if g < 3 or g == n:
        return 1.0, 0.0, g, 1.0
    means = np.bincount(codes, weights=x, minlength=g) / sizes
    msb = (sizes * (means - x.mean()) ** 2).sum() / (g - 1)
    msw = ((x - means[codes]) ** 2).sum() / (n - g)
    m0 = (n - (sizes ** 2).sum() / n) / (g - 1)
    denom = msb + (m0 - 1) * msw
    if not np.isfinite(denom) or denom <= 0:  # every value the same: nothing to estimate
        return 1.0, 0.0, g, 1.0
    icc = float((msb - msw) / denom)  # 1 when members of a group are equal and groups differ
    p_value = float(f_dist.sf(msb / msw, g - 1, n - g)) if msw > 0 else 0.0
    return float(1 + ((sizes ** 2).sum() / n - 1) * max(icc, 0.0)), icc, g, p_value


#: counts within this many of 0 or n get the Poisson end in `wilson_ci` (Brown, Cai and DasGupta 2001
#: use 2 up to n = 50 and 3 up to 100; 3 throughout keeps the least coverage near rates 0 and 1 at
#: 0.927-0.951 for n = 10-1000, where 2 leaves 0.916 at n = 40-100: benchmarks/coverage_edges.py)
WILSON_POISSON_COUNTS = 3


def wilson_ci(successes, n: int, level: float = 0.95, boundary: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a binomial proportion (elementwise over ``successes``), by default
    with Brown, Cai and DasGupta's (2001, sec. 4.1.1) correction near 0 and 1: for 1 to
    `WILSON_POISSON_COUNTS` successes the lower end becomes the one-sided Poisson bound
    ``chi2.ppf(1 - level, 2k) / (2n)`` where that is lower, and the upper end mirrors it for 1 to 3
    failures. The plain Wilson interval's coverage falls to 0.84 at true rates just above 0 (and just
    below 1), where refusal rates often sit: its lower end at one success out of n is too high. The
    correction only widens, and leaves the interval untouched for counts away from both ends.
    Counts may be fractional (a count over a design effect): the Poisson end then holds for
    0 < k <= 3, continuous in k.
    ``boundary=False`` gives the plain interval."""
    from scipy.stats import chi2, norm

    z = norm.ppf(1 - (1 - level) / 2)
    k = np.asarray(successes, float)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # exactly 0 at no successes and 1 at all (the formula's rounding can miss by an ulp)
    lo, hi = np.where(k <= 0, 0.0, np.clip(centre - half, 0, 1)), np.where(k >= n, 1.0, np.clip(centre + half, 0, 1))
    if not boundary:
        return lo, hi
    # counts may be fractional (a count over a design effect, `compare`): the Poisson end is
    # continuous in k, so it holds for 0 < k <= 3 (it tends to 0 as k does)
    near_zero = (k > 0) & (k <= WILSON_POISSON_COUNTS)
    near_n = (n - k > 0) & (n - k <= WILSON_POISSON_COUNTS)
    poisson_lo = chi2.ppf(1 - level, 2 * np.clip(k, 1e-12, None)) / (2 * n)
    poisson_hi = 1 - chi2.ppf(1 - level, 2 * np.clip(n - k, 1e-12, None)) / (2 * n)
    return np.where(near_zero, np.minimum(lo, poisson_lo), lo), np.where(near_n, np.maximum(hi, poisson_hi), hi)


def auroc_score_ci(auc, n_pos: int, n_neg: int, level: float = 0.95, iters: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Score interval of an AUROC from ``n_pos`` positives and ``n_neg`` negatives (elementwise
    over ``auc``): the values t with (auc - t)^2 <= z^2 V(t), V the Hanley-McNeil variance at t with
    both class sizes replaced by their mean (after Newcombe 2006). Unlike a bootstrap interval it
    keeps its width at AUROC 0 or 1, where every resample repeats the sample's perfect separation.
    Each end found by bisection (``iters`` halvings: 1e-18 of the unit interval). NaN gives NaN."""
    from scipy.stats import norm

    z2 = norm.ppf(1 - (1 - level) / 2) ** 2
    a = np.asarray(auc, float)
    k = (n_pos + n_neg) / 2 - 1

    def excess(t):  # > 0 outside the interval, <= 0 inside
        v = t * (1 - t) * (1 + k * (1 - t) / (2 - t) + k * t / (1 + t)) / (n_pos * n_neg)
        return (a - t) ** 2 - z2 * v

    ok = np.isfinite(a)
    a = np.where(ok, np.clip(a, 0.0, 1.0), 0.5)
    lo_out, lo_in = np.zeros_like(a), a.copy()  # excess(0) = a^2 >= 0, excess(a) <= 0
    hi_in, hi_out = a.copy(), np.ones_like(a)   # excess(1) = (1 - a)^2 >= 0
    for _ in range(iters):
        mid = (lo_out + lo_in) / 2
        out = excess(mid) > 0
        lo_out, lo_in = np.where(out, mid, lo_out), np.where(out, lo_in, mid)
        mid = (hi_in + hi_out) / 2
        out = excess(mid) > 0
        hi_in, hi_out = np.where(out, hi_in, mid), np.where(out, mid, hi_out)
    return np.where(ok, lo_in, np.nan), np.where(ok, hi_in, np.nan)


def order_quantile(samples: np.ndarray, q) -> np.ndarray:
    """Quantile ``q`` of ``samples`` along the last axis, as an order statistic (no interpolation),
    so +-inf samples count as the most extreme values instead of turning the result into NaN.
    NaN samples are dropped; a row of NaN only gives NaN. ``q``: scalar or ``samples.shape[:-1]``."""
    s = np.sort(np.asarray(samples, float), axis=-1)  # NaN sort last
    valid = (~np.isnan(s)).sum(-1)
    k = np.clip(np.ceil(np.asarray(q, float) * valid).astype(int) - 1, 0, np.maximum(valid - 1, 0))
    k = np.broadcast_to(k, s.shape[:-1])
    out = np.take_along_axis(s, k[..., None], -1)[..., 0]
    return np.where(valid > 0, out, np.nan)
