"""Prefix-shared sweep vs independent passes: 8 text-suffix conditions over the same queries.

    python benchmarks/bench_sweep.py                    # tiny-random, CPU, 16 queries
    python benchmarks/bench_sweep.py --device cuda --model 7b-random --dtype bfloat16
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_gpu import CONDITIONS, bench_sweep  # noqa: E402
from bench_scorer import load_bench_model  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-random")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--queries", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    bundle = load_bench_model(args.model, args.device, args.dtype, None)
    r = bench_sweep(bundle, args.queries, args.batch, args.repeats, args.device)
    print(f"model {bundle.name}, {args.dtype}, {args.device}; {len(CONDITIONS)} conditions x {r['queries']} queries, "
          f"query batch {r['batch']}")
    print("| method | s (median of %d) | speedup | max abs margin diff |" % args.repeats)
    print("|---|---|---|---|")
    print(f"| independent passes | {r['independent_s']:.3f} | 1.00x | |")
    print(f"| prefix-shared sweep | {r['sweep_s']:.3f} | {r['speedup']:.2f}x | {r['max_margin_diff']:.1e} |")


if __name__ == "__main__":
    main()
