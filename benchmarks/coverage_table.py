"""Coverage of compare()'s intervals on simulated data with known truth.

    python benchmarks/coverage_table.py                       # the table of docs/analysis.md
    python benchmarks/coverage_table.py --datasets 1000 --n-boot 1000 --method percentile

Each scenario draws paired (baseline, defended) margins per class: baseline ~ centre_c + scale *
noise, defended = baseline + shift_c + change noise. The truth of every figure is its value on
one very large sample of the same scenario (200k queries per class); for the rank-based
(Hodges-Lehmann) figures, whose noise is symmetric, it is the planted shift. A figure's coverage
is the share of data sets whose interval holds its truth (nominal 0.95; with D data sets the
Monte Carlo SE is sqrt(0.95 * 0.05 / D), 0.010 for D = 500).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from probing.analysis.compare import interval_arrays, output_figures, rank_figures  # noqa: E402


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
    fn = rank_figures if only_rank else (lambda *a: output_figures(*a, rank=rank))  # noqa: E731
    for start in range(0, n_datasets, chunk):
        size = (min(chunk, n_datasets - start),)
        est = interval_arrays(fn, *scenario.sample(rng, size), n_boot=n_boot, seed=rng, level=level, method=method)
        for k, (_, lo, hi, _) in est.items():
            if k not in SKIP:
                hits.setdefault(k, []).append((lo <= truth[k]) & (truth[k] <= hi))
    return {k: float(np.concatenate(v).mean()) for k, v in hits.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", type=int, default=500)
    ap.add_argument("--n-boot", type=int, default=400)
    ap.add_argument("--method", default="auto", choices=("auto", "expanded", "percentile", "bca"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-rank", action="store_true", help="leave out the Hodges-Lehmann figures (the slow part)")
    args = ap.parse_args(argv)
    t0 = time.time()
    cols = {s.name: coverage(s, args.datasets, args.n_boot, args.seed, args.method, rank=not args.no_rank)
            for s in SCENARIOS}
    figs = list(next(iter(cols.values())))
    print(f"coverage of 95% intervals ({args.method}; {args.datasets} data sets x {args.n_boot} resamples; "
          f"MC SE {np.sqrt(0.95 * 0.05 / args.datasets):.3f})\n")
    print("| figure | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for f in figs:
        print(f"| `{f}` | " + " | ".join(f"{cols[s][f]:.3f}" for s in cols) + " |")
    lo = min(min(c.values()) for c in cols.values())
    hi = max(max(c.values()) for c in cols.values())
    print(f"\nrange {lo:.3f} .. {hi:.3f}; {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
