"""Coverage of compare()'s intervals on simulated data with known truth.

    python benchmarks/coverage_table.py                       # the tables of docs/analysis.md
    python benchmarks/coverage_table.py --datasets 1000 --n-boot 1000 --method percentile

Each scenario draws paired (baseline, defended) margins per class: baseline ~ centre_c + scale *
noise, defended = baseline + shift_c + change noise. The truth of every figure is its value on
one very large sample of the same scenario (200k queries per class); for the rank-based
(Hodges-Lehmann) figures, whose noise is symmetric, it is the planted shift. A figure's coverage
is the share of data sets whose interval holds its truth (nominal 0.95; with D data sets the
Monte Carlo SE is sqrt(0.95 * 0.05 / D): 0.004 for D = 3000, 0.009 for D = 600). The rank-based
figures are slow (all pairs of a class), so they get their own, smaller number of data sets.

The refusal rates are binomial counts with Wilson intervals: their coverage at n queries and a
true rate p is computed exactly (sum of binomial probabilities; no simulation), printed per
scenario beside the simulated value, and over a grid of p in a second table (`rate_table`).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from probing.analysis.compare import interval_arrays, output_figures  # noqa: E402


@dataclass(frozen=True)
class Scenario:
    name: str
    n_h: int
    n_b: int
    tails: str = "normal"        # "normal" or "t5" (Student t, 5 degrees of freedom: heavy tails, finite variance)
    shift_h: float = 0.6         # planted mean change of harmful margins
    shift_b: float = 0.2         # ... of benign margins
    sep: float = 1.0             # baseline distance of class centres
    noise: float = 0.5           # SD of the per-query change

    def draw(self, rng: np.random.Generator, size: tuple, n: int) -> np.ndarray:
        if self.tails == "normal":
            return rng.normal(0, 1, size + (n,))
        return rng.standard_t(5, size + (n,)) / np.sqrt(5 / 3)  # unit variance

    def sample(self, rng, size: tuple = ()):
        """(b_h, b_b, d_h, d_b), each ``size + (n_c,)``."""
        b_h = self.sep / 2 + self.draw(rng, size, self.n_h)
        b_b = -self.sep / 2 + 1.3 * self.draw(rng, size, self.n_b)  # unequal class SDs
        d_h = b_h + self.shift_h + self.noise * self.draw(rng, size, self.n_h)
        d_b = b_b + self.shift_b + 1.5 * self.noise * self.draw(rng, size, self.n_b)
        return b_h, b_b, d_h, d_b

    def truth(self, n: int = 200_000, seed: int = 12345) -> dict[str, float]:
        big = Scenario(self.name, n, n, self.tails, self.shift_h, self.shift_b, self.sep, self.noise)
        out = {k: float(v) for k, v in output_figures(*big.sample(np.random.default_rng(seed))).items()}
        out.update({"hl_harmful_change": self.shift_h, "hl_benign_change": self.shift_b,
                    "hl_common_shift": (self.shift_h + self.shift_b) / 2,
                    "hl_differential": self.shift_h - self.shift_b})
        return out


SCENARIOS = (
    Scenario("normal 10/10", 10, 10),
    Scenario("normal 20/50 (unbalanced)", 20, 50),
    Scenario("normal 50/50", 50, 50),
    Scenario("t5 30/30 (heavy tails)", 30, 30, "t5"),
    Scenario("t5 12/40 (heavy, unbalanced)", 12, 40, "t5"),
)

SKIP = ("mean_shift_margin",)  # the same number as common_shift


def coverage(scenario: Scenario, n_datasets: int = 500, n_boot: int = 400, seed: int = 0,
             method: str = "auto", level: float = 0.95, chunk: int = 100, rank: bool = True,
             only_rank: bool = False) -> dict[str, float]:
    """Share of ``n_datasets`` simulated data sets whose interval holds the truth, per figure
    (``rank``: with the Hodges-Lehmann figures; ``only_rank``: those alone, which is faster)."""
    truth = scenario.truth()
    rng = np.random.default_rng(seed)
    hits: dict[str, list] = {}
    fn = (lambda *a: {}) if only_rank else output_figures  # noqa: E731  (rank figures: rank=True below)
    for start in range(0, n_datasets, chunk):
        size = (min(chunk, n_datasets - start),)
        est = interval_arrays(fn, *scenario.sample(rng, size), n_boot=n_boot, seed=rng, level=level, method=method,
                              rank=rank or only_rank, pairwise=False)
        for k, (_, lo, hi, _) in est.items():
            if k not in SKIP:
                hits.setdefault(k, []).append((lo <= truth[k]) & (truth[k] <= hi))
    return {k: float(np.concatenate(v).mean()) for k, v in hits.items()}


RATE_SIDES = {"refusal_harmful_base": "h", "refusal_harmful_def": "h",
              "refusal_benign_base": "b", "refusal_benign_def": "b"}


def _binomial_interval(method: str, k: np.ndarray, n: int, level: float):
    """Lower and upper ends of a standard binomial interval at counts ``k`` (Brown, Cai and
    DasGupta 2001): "wilson" (what compare() reports: Wilson with the Poisson ends near 0 and 1),
    "wilson_plain" (without them), "jeffreys", "agresti_coull", "clopper_pearson"."""
    from scipy.stats import beta, norm

    from probing.analysis.metrics import wilson_ci

    a = (1 - level) / 2
    if method in ("wilson", "wilson_plain"):
        return wilson_ci(k, n, level, boundary=method == "wilson")
    if method == "jeffreys":
        return (np.where(k > 0, beta.ppf(a, k + 0.5, n - k + 0.5), 0.0),
                np.where(k < n, beta.ppf(1 - a, k + 0.5, n - k + 0.5), 1.0))
    if method == "agresti_coull":
        z = norm.ppf(1 - a)
        nt = n + z * z
        pt = (k + z * z / 2) / nt
        half = z * np.sqrt(pt * (1 - pt) / nt)
        return np.maximum(pt - half, 0.0), np.minimum(pt + half, 1.0)
    if method == "clopper_pearson":
        with np.errstate(invalid="ignore"):
            return (np.where(k > 0, beta.ppf(a, np.maximum(k, 1), n - k + 1), 0.0),
                    np.where(k < n, beta.ppf(1 - a, k + 1, np.maximum(n - k, 1)), 1.0))
    raise ValueError(method)


RATE_METHODS = ("wilson", "wilson_plain", "jeffreys", "agresti_coull", "clopper_pearson")


def exact_rate_coverage(n: int, p, level: float = 0.95, method: str = "wilson") -> np.ndarray:
    """Exact coverage of a binomial interval (default: Wilson, the one compare() gives refusal
    rates) with ``n`` trials at true rate(s) ``p``: the binomial probability of the counts whose
    interval holds ``p``."""
    from scipy.stats import binom

    k = np.arange(n + 1)
    lo, hi = _binomial_interval(method, k.astype(float), n, level)
    p = np.atleast_1d(np.asarray(p, float))
    inside = (lo[:, None] <= p[None]) & (p[None] <= hi[:, None])
    return (binom.pmf(k[:, None], n, p[None]) * inside).sum(0)


def rate_table(ns=(10, 12, 20, 40, 50, 100), level: float = 0.95) -> list[str]:
    """Exact coverage over true rates 0.05..0.95 (step 0.001) per number of queries and method:
    mean, lowest, highest, and the share of rates with coverage in 0.93-0.97."""
    grid = np.linspace(0.05, 0.95, 901)
    lines = ["| queries n | method | mean coverage | lowest | highest | share of rates in 0.93-0.97 |",
             "|---|---|---|---|---|---|"]
    for n in ns:
        for method in RATE_METHODS:
            c = exact_rate_coverage(n, grid, level, method)
            lines.append(f"| {n} | {method} | {c.mean():.3f} | {c.min():.3f} | {c.max():.3f} | "
                         f"{((c >= 0.93) & (c <= 0.97)).mean():.2f} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", type=int, default=3000, help="data sets per scenario (all but the rank figures)")
    ap.add_argument("--rank-datasets", type=int, default=600, help="data sets per scenario for the rank figures")
    ap.add_argument("--n-boot", type=int, default=400)
    ap.add_argument("--method", default="auto", choices=("auto", "expanded", "percentile", "bca"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-rank", action="store_true", help="leave out the Hodges-Lehmann figures (the slow part)")
    ap.add_argument("--rates-only", action="store_true",
                    help="only the exact coverage table of binomial intervals for refusal rates (instant)")
    args = ap.parse_args(argv)
    if args.rates_only:
        print("\n".join(rate_table(level=0.95)))
        return 0
    t0 = time.time()
    cols = {}
    for s in SCENARIOS:
        cols[s.name] = coverage(s, args.datasets, args.n_boot, args.seed, args.method, rank=False)
        if not args.no_rank:
            cols[s.name].update(coverage(s, args.rank_datasets, args.n_boot, args.seed, args.method, only_rank=True))
    truths = {s.name: s.truth() for s in SCENARIOS}
    sizes = {s.name: {"h": s.n_h, "b": s.n_b} for s in SCENARIOS}
    figs = list(next(iter(cols.values())))
    print(f"coverage of 95% intervals ({args.method}; {args.datasets} data sets (rank figures: "
          f"{args.rank_datasets}) x {args.n_boot} resamples; MC SE {np.sqrt(0.95 * 0.05 / args.datasets):.3f} "
          f"({np.sqrt(0.95 * 0.05 / args.rank_datasets):.3f}); refusal rates: simulated / exact)\n")
    print("| figure | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for f in figs:
        cells = []
        for name in cols:
            cell = f"{cols[name][f]:.3f}"
            if f in RATE_SIDES:
                exact = exact_rate_coverage(sizes[name][RATE_SIDES[f]], truths[name][f])[0]
                cell += f" / {exact:.3f}"
            cells.append(cell)
        print(f"| `{f}` | " + " | ".join(cells) + " |")
    lo = min(min(c.values()) for c in cols.values())
    hi = max(max(c.values()) for c in cols.values())
    print(f"\nrange {lo:.3f} .. {hi:.3f} (simulated)")
    print("\n(exact coverage of binomial intervals over true rates: --rates-only)")
    print(f"\n{time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
