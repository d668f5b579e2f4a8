"""Time and peak memory of compare() as the classes grow (docs/performance.md, section 10).

    python benchmarks/compare_scale.py                                  # 250..1700 queries per class
    python benchmarks/compare_scale.py --sizes 250,500 --root /path/to/an/older/checkout
    python benchmarks/compare_scale.py --parts                          # where the HL figures' time goes

Each size runs in a fresh Python process (so its peak RSS is its own): synthetic margins, n
harmful and n benign queries (baseline harmful ~ N(1, 1), benign ~ N(0, 1); defended = baseline
+ 0.3 (harmful) + N(0, 0.5) noise), then ``compare(baseline, defended, n_boot=..., rank=...)``
with the default method ("auto": BCa / expanded intervals, both need the jackknife). Reported:
wall time of compare() alone, the process's peak RSS (ru_maxrss) with the RSS after the
imports subtracted, and one interval (to see that two checkouts agree). ``--root`` imports
``probing`` from another checkout (e.g. the commit before a change), so the same script measures
both. ``--group K`` puts each class's queries in requests of K (meta "group"): compare() then
resamples whole requests (the cluster bootstrap). ``--parts`` times, per size, the pieces of the Hodges-Lehmann figures' cost instead: their
exact leave-one-out values (`_rank_jackknife`), the same recomputed row by row as a chunked
jackknife would (20 rows timed, times 2n), one bootstrap resample of them recomputed
(`rank_figures` on the resampled values) and from its counts (`_ResampledRanks`, what
compare() runs; its one-off sort of the pairs timed apart).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np, torch
from probing import ScoreTable
from probing.analysis import compare
n, n_boot, rank, group = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", int(sys.argv[5])
rng = np.random.default_rng(0)
h, b = rng.normal(1, 1, n), rng.normal(0, 1, n)
meta = [{"group": f"{'hb'[i >= n]}{(i % n) // group}"} for i in range(2 * n)] if group > 1 else None
def table(h, b):
    m = torch.tensor(np.r_[h, b], dtype=torch.float32)
    return ScoreTable([f"q{i}" for i in range(2 * n)], ["harmful"] * n + ["benign"] * n, m, m[:, None].clone(), [0],
                      row_meta=meta)
base, dfd = table(h, b), table(h + 0.3 + rng.normal(0, .5, n), b + rng.normal(0, .5, n))
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
e = compare(base, dfd, n_boot=n_boot, rank=rank)
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"s": dt, "peak_gb": peak / 1e6, "extra_gb": (peak - rss0) / 1e6,
                  "differential": str(e["hl_differential" if rank else "differential"]), "label": e.label}))
"""


def parts(sizes: list[int]) -> int:
    import time

    import numpy as np

    sys.path.insert(0, str(ROOT))
    from probing.analysis.compare import _rank_jackknife, _ResampledRanks, rank_figures

    print("| queries per class | exact HL jackknife s | HL jackknife row by row s (20 rows timed) | "
          "one HL bootstrap resample recomputed ms (= s per 1000) | sorting the pairs once s | "
          "one resample from its counts ms |")
    print("|---|---|---|---|---|---|")
    for n in sizes:
        rng = np.random.default_rng(0)
        b_h, b_b = rng.normal(1, 1, n), rng.normal(0, 1, n)
        d_h, d_b = b_h + 0.3 + rng.normal(0, .5, n), b_b + rng.normal(0, .5, n)
        t0 = time.perf_counter()
        _rank_jackknife(b_h, b_b, d_h, d_b)
        exact = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(20):  # what _jackknife does per left-out query: every figure again without it
            rank_figures(np.delete(b_h, i), b_b, np.delete(d_h, i), d_b)
        rows = (time.perf_counter() - t0) / 20 * 2 * n
        t0 = time.perf_counter()
        for _ in range(5):
            rank_figures(b_h, b_b, d_h, d_b)
        one = (time.perf_counter() - t0) / 5
        t0 = time.perf_counter()
        ranks = _ResampledRanks(d_h - b_h, d_b - b_b)
        setup = time.perf_counter() - t0
        draws = [(rng.integers(0, n, (1, n)), rng.integers(0, n, (1, n))) for _ in range(20)]
        t0 = time.perf_counter()
        for ih, ib in draws:
            ranks(ih, ib)
        counts = (time.perf_counter() - t0) / len(draws)
        print(f"| {n} | {exact:.2f} | {rows:.0f} | {one * 1e3:.0f} | {setup:.2f} | {counts * 1e3:.1f} |", flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="250,500,1000,1700", help="queries per class, comma-separated")
    ap.add_argument("--n-boot", type=int, default=1000, help="resamples (the study's default: 1000)")
    ap.add_argument("--no-rank", action="store_true", help="compare(rank=False): no Hodges-Lehmann figures")
    ap.add_argument("--root", default=str(ROOT), help="checkout to import probing from")
    ap.add_argument("--parts", action="store_true", help="time the pieces of the HL figures' cost (this checkout)")
    ap.add_argument("--group", type=int, default=1,
                    help="queries per request (meta 'group', within each class): > 1 times the cluster bootstrap")
    args = ap.parse_args(argv)
    if args.parts:
        return parts([int(x) for x in args.sizes.split(",")])
    print(f"code: {args.root}; n_boot {args.n_boot}; rank {not args.no_rank}; queries per request {args.group}; "
          f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}\n")
    print(f"| queries per class | compare() s | peak RSS GB | above the imports GB | "
          f"{'differential' if args.no_rank else 'hl_differential'} | label |")
    print("|---|---|---|---|---|---|")
    for n in (int(x) for x in args.sizes.split(",")):
        r = subprocess.run([sys.executable, "-c", CHILD, args.root, str(n), str(args.n_boot),
                            "0" if args.no_rank else "1", str(args.group)], capture_output=True, text=True)
        if r.returncode:
            print(f"| {n} | failed (exit {r.returncode}): {r.stderr.strip().splitlines()[-1:]} | | | | |")
            continue
        d = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"| {n} | {d['s']:.1f} | {d['peak_gb']:.2f} | {d['extra_gb']:.2f} | {d['differential']} | {d['label']} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
