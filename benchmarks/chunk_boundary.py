"""The main thread's host work at a study chunk's start, before its first batch goes to the device.

    python benchmarks/chunk_boundary.py                      # this checkout
    python benchmarks/chunk_boundary.py --root /path/to/old  # another checkout (a git worktree)

Runs `gpu_study.py`'s study (toy + MM-SafetyBench tiny subset, 8 conditions, batch 16) on the CPU
with tiny-random and times, per chunk, the main thread from `Study._score_query_major`'s start
to its first `device_inputs` call (the first batch handed to the device). On a GPU the device idles
for that long at every chunk boundary (docs/performance.md §2b). The first chunk is built in the
main thread (nothing runs ahead of it), so the mean is over the others.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from checkout_timing import Marks, add_checkout_arguments, gap_cells, use_checkout

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkout_arguments(p, runs=3, queries=32)
    args = p.parse_args(argv)
    root = use_checkout(args.root)

    import torch

    import experiments.study as study_mod
    import gpu_study
    import probing.prefix as prefix_mod
    import probing.scorer as scorer_mod
    from bench_scorer import load_bench_model

    events = Marks()
    marked = events.mark
    marked(study_mod.Study, "_score_query_major", "chunk")
    marked(scorer_mod, "device_inputs", "device")
    marked(prefix_mod, "device_inputs", "device")

    bundle = load_bench_model("tiny-random", "cpu", "float32", None)
    datasets = gpu_study.study_datasets(args.queries, args.mmsb if Path(args.mmsb).is_dir() else None)
    print(f"code: {root}; torch {torch.__version__}, {torch.get_num_threads()} threads; tiny-random, batch 16")
    print("| run | wall s | chunk start -> first batch to the device, ms per chunk | mean over chunks 2.. |")
    print("|---|---|---|---|")
    for run in range(args.runs):
        events.clear()
        wall, *_ = gpu_study.study_once(bundle, datasets, 16, "cpu", profiled=False)
        gaps = []
        for i, (tag, t) in enumerate(events):
            if tag == "chunk":
                gaps.append(next(t2 for tag2, t2 in events[i + 1:] if tag2 == "device") - t)
        print(f"| {run} | {wall:.1f} | {gap_cells(gaps, 1)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
