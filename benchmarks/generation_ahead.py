"""The study's up-front generation: how long each `generate` call works on the host before the model.

    python benchmarks/generation_ahead.py                      # this checkout
    python benchmarks/generation_ahead.py --root /path/to/old  # another checkout (a git worktree)

Runs `Study.prepare_generations` for `qr_caption` over MM-SafetyBench's tiny-subset stand-in images
(96 queries at 1024 px) and toy queries on tiny-random, in generation batches of ``--batch``
(forced: on the CPU the fitted batch would hold the whole run), and times, per batch, the main
thread from the previous batch's end (the first: from the call's start) to this batch's model
call (`encode_pixels`, which follows the images). On a GPU the device idles for that long before
every batch. Since 9c4974c the next batch's images are processed while the current one
generates, on accelerators (`experiments.study.images_ahead`); ``--ahead on`` (the default here)
forces that on the CPU too, to measure it, though there it competes with the decode for the
same cores (docs/performance.md §2b).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from checkout_timing import Marks, add_checkout_arguments, gap_cells, use_checkout

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkout_arguments(p, runs=2, queries=16)
    p.add_argument("--batch", type=int, default=16, help="generation batch size")
    p.add_argument("--ahead", choices=("auto", "on", "off"), default="on",
                   help="process the next batch's images while one generates: auto = as the study decides "
                        "(on accelerators only); on/off force it (code before 9c4974c has no such choice)")
    args = p.parse_args(argv)
    root = use_checkout(args.root)

    import torch

    import experiments.study as study_mod
    import gpu_study
    import probing.generation as generation_mod
    from bench_scorer import load_bench_model
    from experiments.study_config import StudyConfig

    marks = Marks()
    marked = marks.mark
    marked(generation_mod, "generate", "start", after="end")
    marked(generation_mod, "encode_pixels", "model")
    import defenses.rewriting as rewriting  # it imported `generate` by name
    rewriting.generate = generation_mod.generate

    bundle = load_bench_model("tiny-random", "cpu", "float32", None)
    study_mod.load_model = lambda *a, **k: bundle
    study_mod.fit_generation_batch = lambda *a, **k: args.batch
    if args.ahead != "auto" and hasattr(study_mod, "images_ahead"):
        study_mod.images_ahead = lambda bundle: args.ahead == "on"
    datasets = gpu_study.study_datasets(args.queries, args.mmsb if Path(args.mmsb).is_dir() else None)
    ahead = args.ahead if hasattr(study_mod, "images_ahead") else "n/a"
    print(f"code: {root}; torch {torch.__version__}, {torch.get_num_threads()} threads; tiny-random, "
          f"qr_caption, generation batch {args.batch}, images ahead: {ahead}")
    print("| run | batches | wall s | previous batch's end -> model, ms per batch | mean over batches 2.. |")
    print("|---|---|---|---|---|")
    for run in range(args.runs):
        marks.clear()
        with tempfile.TemporaryDirectory() as tmp:
            cfg = StudyConfig(model="tiny-random", out=str(Path(tmp) / "g"), defenses=["qr_caption"], ensembles=[],
                              datasets=datasets, batch_size=16, generation_check=0, max_new_tokens=8)
            study = study_mod.Study(cfg)
            try:
                t0 = time.perf_counter()
                marks.append(("end", t0))  # the first batch's wait counts from here
                study.prepare_generations(["qr_caption"])
                wall = time.perf_counter() - t0
            finally:
                study.run.close()
        # per batch that runs the model: from the previous batch's end (the host's turn) to its model call
        gaps, last_end = [], None
        for tag, t in marks:
            if tag == "end":
                last_end = t
            elif tag == "model" and last_end is not None:
                gaps.append(t - last_end)
                last_end = None
        print(f"| {run} | {len(gaps)} | {wall:.1f} | {gap_cells(gaps, 0)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
