"""Correctness on a device: the table of docs/performance.md section 2 ("Correctness on the GPU").

    python benchmarks/gpu_check.py --device cuda                      # 7B architecture, random weights
    python benchmarks/gpu_check.py --device cpu --model tiny-random   # smoke run anywhere

For float32 and bfloat16: the prefix-shared sweep against independent passes (max |margin|
difference over 8 queries x 8 prompt conditions, and the same for lens margins), batch 8 against
batch 1 for independent scoring, and the SD of the margins (the scale those differences are read
against). It replaces the uncommitted ``.gpu/check.py`` of the session that measured that table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from bench_gpu import CONDITIONS  # noqa: E402
from bench_scorer import load_bench_model, make_queries  # noqa: E402

from probing import RefusalScorer  # noqa: E402
from probing.sweep import score_conditions  # noqa: E402


def check(model: str, device: str, dtype: str, n_queries: int = 8) -> dict:
    torch.manual_seed(0)
    bundle = load_bench_model(model, device, dtype, None)
    queries = make_queries(n_queries)
    batched = RefusalScorer(bundle, layers="all", batch_size=n_queries, progress=False)
    single = RefusalScorer(bundle, layers="all", batch_size=1, progress=False)
    independent = {n: batched.score(queries, prompt=s) for n, s in CONDITIONS.items()}
    swept = score_conditions(batched, queries, CONDITIONS)
    one = {n: single.score(queries, prompt=s) for n, s in CONDITIONS.items()}

    def worst(a, b, what):
        return max(float((getattr(a[n], what) - getattr(b[n], what)).abs().max()) for n in CONDITIONS)

    return {"dtype": dtype, "sweep_margin": worst(independent, swept, "margin"),
            "sweep_lens": worst(independent, swept, "lens_margin"),
            "batch8_vs_1": worst(independent, one, "margin"),
            "margin_sd": float(torch.cat([t.margin for t in independent.values()]).std())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="7b-random")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default="float32,bfloat16")
    args = p.parse_args(argv)
    print("| dtype | sweep vs independent, max abs margin diff | independent batch 8 vs batch 1 | margin SD |")
    print("|---|---|---|---|")
    for dtype in args.dtypes.split(","):
        r = check(args.model, args.device, dtype)
        print(f"| {dtype} | {r['sweep_margin']:.1e} (lens {r['sweep_lens']:.1e}) | {r['batch8_vs_1']:.1e} | "
              f"{r['margin_sd']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
