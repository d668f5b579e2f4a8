"""Where compare()'s intervals cover less than 95%: the cases benchmarks/coverage_table.py does not
draw (it has sep = 1, classes of 10 or more, symmetric noise). Printed as five tables, the figures
docs/analysis.md ("Where the intervals cover less") quotes.

    python benchmarks/coverage_edges.py            # about 5 minutes on 2 cores
    python benchmarks/coverage_edges.py --datasets 500

1. AUROC when the classes separate well (a good readout): coverage of auroc_base / auroc_change
   and the share of intervals of zero width ([1, 1], [0, 0]); auroc_change's bootstrap interval
   widened only where a sample AUROC is 0 or 1 (the rule before AUROC_EDGE_SHARE) beside it; d'.
2. Small classes: coverage of the class changes at n = 2..8 per class against the ceiling
   1 - 2^(1-n) of any interval inside the range of the n observed changes.
3. Skewed per-query changes (lognormal, a defense that moves a few queries a lot), by method;
   3b: the default method's coverage split by the sample's skewness (can the data warn?).
4. Wilson refusal-rate intervals at true rates near 0 and 1 (exact binomial sums; Clopper-Pearson
   and Jeffreys beside).
5. mechanism_label when one class moves alone, both move, or nothing moves.
6. Deliveries of one request that move together (groups of 3 whose margins and changes share a
   part): coverage with the queries resampled and with whole groups resampled (compare()'s way).
7. A benign and a harmful query that deliver one request (MOSSBench's pairs), correlated across the
   classes: each class resampled on its own against the pairs resampled together.

Each simulated figure's Monte Carlo SE is about 0.005 at 2000 data sets.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from coverage_table import Scenario, coverage, exact_rate_coverage  # noqa: E402

from probing.analysis.compare import Estimate, interval_arrays, mechanism_label, output_figures  # noqa: E402


def covered(est, truth, key) -> float:
    _, lo, hi, _ = est[key]
    return float(((lo <= truth[key]) & (truth[key] <= hi)).mean())


def auroc_table(d: int) -> None:
    print("\n1. AUROC near 1 (normal classes sep SD apart, defended = baseline + 0.6 / 0.2 + noise unless said)")
    print("| sep | n per class | true AUROC | auroc_base coverage, zero width | auroc_change coverage, zero width | "
          "auroc_change widened only at a sample AUROC of 0 or 1 | dprime_base coverage |\n|---|---|---|---|---|---|---|")
    rows = [(f"{sep}", Scenario("", n, n, sep=sep)) for sep, n in
            ((1.0, 10), (2.0, 10), (2.0, 30), (3.0, 10), (3.0, 30), (3.0, 100), (4.0, 20))]
    rows += [("2.0, no change", Scenario("", 10, 10, sep=2.0, shift_h=0, shift_b=0, noise=0.3)),
             ("3.0, no change", Scenario("", 40, 40, sep=3.0, shift_h=0, shift_b=0, noise=0.3)),
             ("2.0, harmful +0.8 alone", Scenario("", 15, 40, sep=2.0, shift_h=0.8, shift_b=0)),
             ("3.0, reversed", Reversed(10, 10, 3.0)), ("4.0, reversed", Reversed(20, 20, 4.0))]
    compare_module = importlib.import_module("probing.analysis.compare")
    for desc, s in rows:
        truth = s.truth()
        cells = []
        for share in (compare_module.AUROC_EDGE_SHARE, 1.01):  # 1.01: widened only at a sample AUROC of 0 or 1
            rng = np.random.default_rng(3)
            with mock.patch.object(compare_module, "AUROC_EDGE_SHARE", share):
                cells.append(interval_arrays(output_figures, *s.sample(rng, (d,)), n_boot=300, seed=rng,
                                             pairwise=False))
        est, alone = cells
        flat = {k: float((est[k][1] == est[k][2]).mean()) for k in ("auroc_base", "auroc_change")}
        n = s.n_h if s.n_h == s.n_b else f"{s.n_h}/{s.n_b}"
        print(f"| {desc} | {n} | {truth['auroc_base']:.4f} | {covered(est, truth, 'auroc_base'):.3f}, "
              f"{flat['auroc_base']:.3f} | {covered(est, truth, 'auroc_change'):.3f}, {flat['auroc_change']:.3f} | "
              f"{covered(alone, truth, 'auroc_change'):.3f} | {covered(est, truth, 'dprime_base'):.3f} |")


@dataclass
class Reversed:
    """A defense that reverses the readout: defended = -baseline + 0.3 noise (AUROC near 1 -> near 0)."""

    n_h: int
    n_b: int
    sep: float

    def sample(self, rng, size=()):
        b_h = self.sep / 2 + rng.normal(size=size + (self.n_h,))
        b_b = -self.sep / 2 + 1.3 * rng.normal(size=size + (self.n_b,))
        return b_h, b_b, -b_h + 0.3 * rng.normal(size=b_h.shape), -b_b + 0.3 * rng.normal(size=b_b.shape)

    def truth(self):
        big = Reversed(200_000, 200_000, self.sep)
        return {k: float(v) for k, v in output_figures(*big.sample(np.random.default_rng(12345))).items()}


def small_table(d: int) -> None:
    print("\n2. Small classes (normal data)")
    print("| n per class | harmful_change (ceiling) | harmful_change_sd | common_shift | differential |\n|---|---|---|---|---|")
    for n in (2, 3, 4, 5, 6, 8):
        c = coverage(Scenario(f"{n}/{n}", n, n), d, 300, seed=2, rank=False)
        print(f"| {n} | {c['harmful_change']:.3f} ({1 - 2.0 ** (1 - n):.3f}) | {c['harmful_change_sd']:.3f} | "
              f"{c['common_shift']:.3f} | {c['differential']:.3f} |")


def skew_sample(rng, size, n_h, n_b, s):
    ln = lambda n: rng.lognormal(0, s, size + (n,)) - np.exp(s * s / 2)  # noqa: E731 -- mean 0
    bh, bb = 0.5 + rng.normal(size=size + (n_h,)), -0.5 + 1.3 * rng.normal(size=size + (n_b,))
    return bh, bb, bh + 0.6 + 0.5 * ln(n_h), bb + 0.2 + 0.5 * ln(n_b)


def skew_table(d: int) -> None:
    print("\n3. Skewed changes (lognormal sigma 1, times 0.5, centred)")
    figs = ("harmful_change", "common_shift", "harmful_change_sd")
    print("| n per class | method | " + " | ".join(figs) + " |\n|---|---|---|---|---|")
    truth = output_figures(*skew_sample(np.random.default_rng(1), (), 200_000, 200_000, 1.0))
    for n in (10, 20, 50):
        for method in ("auto", "bca", "percentile"):
            rng = np.random.default_rng(2)
            est = interval_arrays(output_figures, *skew_sample(rng, (d,), n, n, 1.0), n_boot=300, seed=rng,
                                  method=method, pairwise=False)
            print(f"| {n} | {method} | " + " | ".join(f"{covered(est, truth, k):.3f}" for k in figs) + " |")
    skew_split_table(d, truth)


def skew_split_table(d: int, truth: dict) -> None:
    """Whether the sample shows when it is at risk: harmful_change's coverage (method auto) split by
    the harmful changes' sample skewness (adjusted Fisher-Pearson, scipy), lognormal against normal."""
    from scipy.stats import skew

    print("\n3b. harmful_change coverage (auto) split by the sample skewness G1 of the harmful changes")
    print("| n per class | data | coverage | share with G1 >= 1.5 | coverage there | coverage where G1 < 1.5 |"
          "\n|---|---|---|---|---|---|")
    for n in (10, 20, 50):
        for name in ("lognormal sigma 1", "normal"):
            rng = np.random.default_rng(2)
            if name == "normal":
                s = Scenario("", n, n)
                data, want = s.sample(rng, (d,)), s.truth()["harmful_change"]
            else:
                data, want = skew_sample(rng, (d,), n, n, 1.0), truth["harmful_change"]
            _, lo, hi, _ = interval_arrays(output_figures, *data, n_boot=300, seed=rng, pairwise=False)["harmful_change"]
            ok = (lo <= want) & (want <= hi)
            g = skew(data[2] - data[0], axis=-1, bias=False)
            big = g >= 1.5
            there = f"{ok[big].mean():.3f}" if big.any() else "-"
            print(f"| {n} | {name} | {ok.mean():.3f} | {big.mean():.2f} | {there} | {ok[~big].mean():.3f} |")


def rate_table() -> None:
    print("\n4. Refusal-rate intervals at true rates 0.001-0.05 (the same for 0.95-0.999), exact")
    print("| n | method | least coverage | share of rates below 0.93 |\n|---|---|---|---|")
    grid = np.linspace(0.001, 0.05, 491)
    for n in (10, 20, 40, 80, 200):
        for method in ("wilson", "wilson_plain", "clopper_pearson", "jeffreys"):
            c = exact_rate_coverage(n, grid, method=method)
            print(f"| {n} | {method} | {c.min():.3f} | {(c < .93).mean():.2f} |")


def label_table(d: int) -> None:
    print("\n5. mechanism_label (20/20 unless said; normal data, change noise 0.5 SD)")
    print("| planted | labels (share of data sets) |\n|---|---|")
    keys = ("harmful_change_sd", "benign_change_sd", "differential_sd")
    for desc, (n_h, n_b, sh, sb, noise) in (
            ("nothing", (20, 20, 0, 0, .5)), ("nothing, 12/40, noise 1", (12, 40, 0, 0, 1.)),
            ("harmful +0.4 alone", (20, 20, .4, 0, .5)), ("harmful +0.6 alone", (20, 20, .6, 0, .5)),
            ("benign +0.4 alone", (20, 20, 0, .4, .5)), ("benign +0.6 alone", (20, 20, 0, .6, .5)),
            ("both +0.4", (20, 20, .4, .4, .5)), ("both +0.6", (20, 20, .6, .6, .5)),
            ("both +0.8", (20, 20, .8, .8, .5))):
        rng = np.random.default_rng(7)
        bh, bb = rng.normal(0.5, 1, (d, n_h)), rng.normal(-0.5, 1, (d, n_b))
        dh, db = bh + sh + noise * rng.normal(size=(d, n_h)), bb + sb + noise * rng.normal(size=(d, n_b))
        est = interval_arrays(output_figures, bh, bb, dh, db, n_boot=300, seed=rng, pairwise=False)
        got = Counter(mechanism_label({k: Estimate(float(est[k][0][i]), float(est[k][1][i]), float(est[k][2][i]))
                                       for k in keys}) for i in range(d))
        print(f"| {desc} | " + ", ".join(f"{k} {v / d:.2f}" for k, v in got.most_common()) + " |")


def group_table(d: int) -> None:
    from scipy.stats import norm

    print("\n6. Deliveries of one request (10 requests of 3 a class; last row: 12 requests of 1-4, 30 queries): "
          "a share icc of the baseline margin's variance and of the change's is the request's; coverage, query "
          "bootstrap -> cluster bootstrap (groups given)")
    truth = {"harmful_change": 0.6, "benign_change": 0.2, "differential": 0.4,
             "auroc_base": norm.cdf(1 / np.sqrt(2)), "auroc_def": norm.cdf(1.4 / np.sqrt(2.5)),
             "refusal_harmful_base": norm.cdf(0.5), "refusal_benign_def": norm.cdf(-0.3 / np.sqrt(1.25))}
    print("| icc | " + " | ".join(truth) + " |\n|---|" + "---|" * len(truth))
    for icc, sizes in ((0.0, [3] * 10), (0.2, [3] * 10), (0.5, [3] * 10), (0.8, [3] * 10), (0.5, [1, 2, 3, 4] * 3),
                       (0.5, [10] + [1] * 20)):
        codes = np.repeat(np.arange(len(sizes)), sizes)
        n = len(codes)
        rng = np.random.default_rng(11)

        def grouped(sd):
            shared = rng.normal(size=(d, len(sizes)))[:, codes]
            return sd * (np.sqrt(icc) * shared + np.sqrt(1 - icc) * rng.normal(size=(d, n)))
        bh, bb = 0.5 + grouped(1.0), -0.5 + grouped(1.0)
        dh, db = bh + 0.6 + grouped(0.5), bb + 0.2 + grouped(0.5)
        cells = {k: [] for k in truth}
        for given in (None, list(codes)):  # a class's own requests (the same name in both would pair them)
            est = interval_arrays(output_figures, bh, bb, dh, db, n_boot=300, seed=5, pairwise=False,
                                  groups_h=given and [f"h{g}" for g in given],
                                  groups_b=given and [f"b{g}" for g in given])
            for k, t in truth.items():
                cells[k].append(covered(est, {k: t}, k))
        name = f"{icc}" + ("" if len(set(sizes)) == 1 else f" (sizes {min(sizes)}-{max(sizes)}, {len(sizes)} requests)")
        print(f"| {name} | " + " | ".join(f"{a:.3f} -> {b:.3f}" for a, b in cells.values()) + " |")


def pair_sample(rng: np.random.Generator, d: int, n: int, rho: float) -> tuple:
    """``d`` data sets of ``n`` pairs: harmful query i and benign query i share a part rho of their
    baseline margins' variance (N(+0.5, 1) and N(-0.5, 1)) and of their changes' (+0.6 and +0.2,
    SD 0.5). (b_h, b_b, d_h, d_b), each ``[d, n]``."""
    shared_base, shared_change = rng.normal(size=(d, n)), rng.normal(size=(d, n))

    def part(shared, sd):
        return sd * (np.sqrt(rho) * shared + np.sqrt(1 - rho) * rng.normal(size=(d, n)))
    bh, bb = 0.5 + part(shared_base, 1.0), -0.5 + part(shared_base, 1.0)
    return bh, bb, bh + 0.6 + part(shared_change, 0.5), bb + 0.2 + part(shared_change, 0.5)


def pair_table(d: int, n: int = 20) -> None:
    print(f"\n7. MOSSBench-like pairs: harmful query i and benign query i deliver one request ({n} pairs); a share rho "
          "of both classes' baseline margins and of their changes is the pair's; coverage, each class resampled on "
          "its own -> pairs resampled together (compare()'s way, groups given)")
    from scipy.stats import norm

    truth = {"harmful_change": .6, "benign_change": .2, "differential": .4, "common_shift": .4, "shift_sd": .4,
             "auroc_base": norm.cdf(1 / np.sqrt(2)),
             "auroc_change": norm.cdf(1.4 / np.sqrt(2.5)) - norm.cdf(1 / np.sqrt(2)), "dprime_base": 1.0}
    print("| rho | " + " | ".join(truth) + " |\n|---|" + "---|" * len(truth))
    for rho in (0.0, 0.5, 0.8):
        bh, bb, dh, db = pair_sample(np.random.default_rng(4), d, n, rho)
        pairs = [f"pair{i}" for i in range(n)]
        cells = [[covered(interval_arrays(output_figures, bh, bb, dh, db, n_boot=300, seed=5, pairwise=False,
                                          groups_h=given, groups_b=given), truth, k) for k in truth]
                 for given in (None, pairs)]
        print(f"| {rho} | " + " | ".join(f"{a:.3f} -> {b:.3f}" for a, b in zip(*cells)) + " |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", type=int, default=2000)
    p.add_argument("--tables", default="1,2,3,4,5,6,7", help="which tables, e.g. 1 or 1,4")
    args = p.parse_args(argv)
    d = args.datasets
    tables = {"1": lambda: auroc_table(d), "2": lambda: small_table(d), "3": lambda: skew_table(d),
              "4": rate_table, "5": lambda: label_table(min(d, 600)), "6": lambda: group_table(min(d, 1000)),
              "7": lambda: pair_table(min(d, 1500))}
    chosen = [t.strip() for t in args.tables.split(",") if t.strip()]
    unknown = [t for t in chosen if t not in tables]
    if unknown:
        p.error(f"--tables: no table {', '.join(unknown)} (there are 1-7)")
    for t in chosen:
        tables[t]()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
