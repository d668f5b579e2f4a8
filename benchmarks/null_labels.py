"""How often a defense that changes nothing gets a mechanism label other than "neither".

    python benchmarks/null_labels.py [--datasets 400] [--n-boot 300]

Simulated runs: baseline margins normal (harmful mean +0.5, benign -0.5, SD 1), the "defended"
margins the baseline plus pure noise (no shift, no separation change), in two designs (20/20
queries with noise SD 0.5; 12/40 with noise SD 1). Each data set is labelled by `compare`'s rule
(`mechanism_label` on 95% intervals from `interval_arrays`, the study's default method). The
label reads three intervals (harmful change, benign change, their difference), none corrected
for the others, so about one data set in ten is expected to get some label by chance.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", type=int, default=400)
    p.add_argument("--n-boot", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from probing.analysis.compare import Estimate, interval_arrays, mechanism_label, output_figures

    rng = np.random.default_rng(args.seed)
    print("| harmful / benign queries | noise SD | data sets | labelled 'neither' | other labels |")
    print("|---|---|---|---|---|")
    for n_h, n_b, noise in ((20, 20, 0.5), (12, 40, 1.0)):
        d = args.datasets
        b_h, b_b = 0.5 + rng.normal(0, 1, (d, n_h)), -0.5 + rng.normal(0, 1, (d, n_b))  # [datasets, n]
        d_h, d_b = b_h + noise * rng.normal(0, 1, (d, n_h)), b_b + noise * rng.normal(0, 1, (d, n_b))
        est = interval_arrays(lambda *a: output_figures(*a), b_h, b_b, d_h, d_b, n_boot=args.n_boot, seed=1)
        labels = collections.Counter(
            mechanism_label({k: Estimate(float(v[i]), float(lo[i]), float(hi[i])) for k, (v, lo, hi, _) in est.items()})
            for i in range(d))
        others = ", ".join(f"{k} {n}" for k, n in labels.most_common() if k != "neither")
        print(f"| {n_h} / {n_b} | {noise} | {d} | {labels['neither']} ({labels['neither'] / d:.0%}) | {others} |")


if __name__ == "__main__":
    main()
