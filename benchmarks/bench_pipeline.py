"""Data-pipeline benchmark: prefetching, the pixel cache and array-based noise injection.

On tiny-random (the scorer's real processor, 576 image tokens) with JPEG files of 336 px and
1024 px on disk (so decoding counts), prints three tables:

  1  per-batch time of `RefusalScorer.score` with the prefetching worker off and on (no pixel
     cache, so every batch decodes and processes its images), and the share of the run the
     forward loop waited for prepared batches
  2  six prompt conditions over the same queries: pixel cache off vs on
  3  NI image defenses: per-query `transform` time (K samples) of the former per-sample PIL round
     trip against the array version (same bytes, checked here too)

Runs are interleaved in one process, order alternating between rounds; medians are reported.

    python benchmarks/bench_pipeline.py                        # 32 queries, batch 8, 3 rounds
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from defenses import ni_image_gaussian, ni_image_mask  # noqa: E402
from defenses.noise import _rng  # noqa: E402
from probing import PromptSpec, Query, RefusalScorer, load_model  # noqa: E402

WORDS = "please describe what the picture shows and explain every detail of the scene carefully".split()
CONDITIONS = [PromptSpec(), PromptSpec(system_prompt="You are a careful assistant."),
              PromptSpec(text_after="Remember to be responsible."), PromptSpec(text_before="Check the image first."),
              PromptSpec(text_after="Answer briefly."), PromptSpec(system_prompt="Refuse harmful requests.")]


def make_files(folder: Path, n: int, size: int) -> list[Query]:
    """n JPEG photos-like images (smooth gradients + noise) of size x size px, one query each."""
    queries = []
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        rng = np.random.default_rng(i)
        base = np.stack([xx * 200 + 30 * i % 50, yy * 180, (xx + yy) * 100], -1)
        arr = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"img{size}_{i}.jpg"
        Image.fromarray(arr).save(path, quality=90)
        text = " ".join(WORDS[: 4 + (i * 5) % len(WORDS)]).capitalize() + "?"
        queries.append(Query(f"q{size}_{i}", text, image=path))
    return queries


def run_score(bundle, queries, batch, prefetch, cache_mb, conditions=(PromptSpec(),)):
    scorer = RefusalScorer(bundle, batch_size=batch, progress=False, prefetch=prefetch, pixel_cache=cache_mb)
    total = wait = 0.0
    margins = []
    for spec in conditions:
        t = scorer.score(queries, prompt=spec)
        total += scorer.last_timing["total_s"]
        wait += scorer.last_timing["wait_s"]
        margins.append(t.margin)
    return total, wait, torch.stack(margins), scorer.pixel_cache


# -- the former NI implementation (one decode and PIL round trip per sample), for comparison ---

def old_gaussian(d, q):
    out = []
    for k in range(d.k):
        rng = _rng(d.seed, q.id, k)
        arr = np.asarray(q.load_image(), dtype=np.float64) / 255.0
        noisy = np.clip(arr + rng.normal(0.0, d.rate, arr.shape), 0, 1)
        out.append(Image.fromarray((noisy * 255).round().astype(np.uint8)))
    return out


def old_mask(d, q):
    out = []
    for k in range(d.k):
        rng = _rng(d.seed, q.id, k)
        arr = np.array(q.load_image())
        h, w = arr.shape[:2]
        for y in range(0, h, d.patch):
            for x in range(0, w, d.patch):
                if rng.random() < d.rate:
                    arr[y:y + d.patch, x:x + d.patch] = 128
        out.append(Image.fromarray(arr))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sizes", default="336,1024")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the forward")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = load_model("tiny-random", seed=0)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"{torch.get_num_threads()} torch threads")
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        files = {s: make_files(Path(tmp), args.queries, s) for s in sizes}
        n_batches = -(-args.queries // args.batch_size)

        # 1: prefetch off / on
        res = {(s, pf): [] for s in sizes for pf in (0, 2)}
        ref = {}
        for rnd in range(args.rounds + 1):  # round 0 warms up
            order = list(res) if rnd % 2 == 0 else list(res)[::-1]
            for s, pf in order:
                total, wait, margins, _ = run_score(bundle, files[s], args.batch_size, pf, 0)
                if (s, 0) in ref:
                    assert torch.equal(margins, ref[(s, 0)]), "prefetch changed a score"
                ref.setdefault((s, 0), margins)
                if rnd:
                    res[(s, pf)].append((total, wait))
        print(f"machine: {machine}; date {datetime.date.today()}; tiny-random, {args.queries} queries, "
              f"batch {args.batch_size} ({n_batches} batches), JPEG files, median of {args.rounds} rounds\n")
        print("| image px | prefetch | s / batch | forward waits for data | speed-up |")
        print("|---|---|---|---|---|")
        for s in sizes:
            base = statistics.median(t for t, _ in res[(s, 0)]) / n_batches
            for pf in (0, 2):
                total = statistics.median(t for t, _ in res[(s, pf)]) / n_batches
                share = statistics.median(w / t for t, w in res[(s, pf)])
                print(f"| {s} | {'off' if pf == 0 else f'on (depth {pf})'} | {total:.4f} | {100 * share:.0f}% | "
                      f"{base / total:.2f}x |")

        # 2: six conditions, pixel cache off / on (prefetch on in both)
        res2 = {(s, mb): [] for s in sizes for mb in (0, 1024)}
        for rnd in range(args.rounds):
            order = list(res2) if rnd % 2 == 0 else list(res2)[::-1]
            for s, mb in order:
                total, _, margins, cache = run_score(bundle, files[s], args.batch_size, 2, mb, CONDITIONS)
                ref.setdefault(("c", s), margins)
                assert torch.equal(margins, ref[("c", s)]), "the pixel cache changed a score"
                res2[(s, mb)].append((total, cache.hits, cache.misses))
        print(f"\n{len(CONDITIONS)} prompt conditions x {args.queries} queries (prefetch on):\n")
        print("| image px | pixel cache | s (all conditions) | hits / misses | speed-up |")
        print("|---|---|---|---|---|")
        for s in sizes:
            base = statistics.median(t for t, _, _ in res2[(s, 0)])
            for mb in (0, 1024):
                total = statistics.median(t for t, _, _ in res2[(s, mb)])
                _, hits, misses = res2[(s, mb)][-1]
                print(f"| {s} | {'off' if mb == 0 else f'{mb} MiB'} | {total:.3f} | {hits} / {misses} | "
                      f"{base / total:.2f}x |")

        # 3: NI transforms, former vs array version
        print("\nNI image defenses, k=4, per query (one JPEG decode included):\n")
        print("| image px | defense | former (s) | arrays (s) | speed-up |")
        print("|---|---|---|---|---|")
        for s in sizes:
            q = files[s][0]
            for d, old in ((ni_image_gaussian(k=4, rate=0.1), old_gaussian), (ni_image_mask(k=4, rate=0.1), old_mask)):
                new_imgs = [v.image for v, _ in d.transform([q], None)[0]]
                assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(new_imgs, old(d, q)))
                t_old, t_new = [], []
                for rnd in range(max(3, args.rounds)):
                    for which in ((0, 1) if rnd % 2 == 0 else (1, 0)):
                        t0 = time.perf_counter()
                        old(d, q) if which == 0 else d.transform([q], None)
                        (t_old if which == 0 else t_new).append(time.perf_counter() - t0)
                a, b = statistics.median(t_old), statistics.median(t_new)
                print(f"| {s} | {d.name} | {a:.4f} | {b:.4f} | {a / b:.2f}x |")


if __name__ == "__main__":
    main()
