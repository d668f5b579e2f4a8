"""Where the scorer's fixed per-call cost goes on short text-only inputs (issue 15: <= 1.10x).

On ~30-token inputs the tiny-random trunk takes ~1.8 ms, so the scorer's fixed work shows. This
splits `RefusalScorer.forward` (hooks held, left-padded read, as `score` runs it) into:

  a        the trunk alone (the floor): LLaVA's `model.model`, as plain transformers runs it
  lm       its language model alone: what `scorer.forward` calls for inputs without pixels (the
           wrapper would only embed the ids), so the floor the scorer's own work adds to
  noop     the trunk with no-op hooks where the scorer hooks (the language model's pre-hook and
           every captured layer): the cost of any hook, PyTorch's slow call path
  hooks    the trunk with the scorer's hooks (decision rows copied per layer)
  forward  `scorer.forward`: hooks, then the readout (final norm, lens and output margins)
  readout  `scorer.forward` with the trunk replaced by its stored output: the readout alone,
           run back to back (warm caches; after a real trunk it costs more, see the table)

Times are this thread's CPU time (``time.thread_time``, one torch thread), medians of
``--repeats`` rounds; variants interleaved round by round, so machine noise hits all alike.

    python benchmarks/bench_overhead.py            # tiny-random, batch 1, 3000 rounds
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import bench_scorer  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-random")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3000)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    bench_scorer.SHORT = True
    bundle = bench_scorer.load_bench_model(args.model, "cpu", "float32", None)
    scorer, inputs = bench_scorer.make_inputs(bundle, args.batch)
    trunk, reader, clock = bundle.model.model, scorer._reader, time.thread_time

    def run_trunk():
        with torch.inference_mode():
            return trunk(**inputs, use_cache=False)

    def run_lm():
        with torch.inference_mode():
            return trunk.language_model(**inputs, use_cache=False)

    class Stored:  # stands in for the trunk (and its language model): returns the stored output
        def __init__(self, out):
            self.out = out
            self.language_model = self

        def __call__(self, **_kw):
            return self.out

    def noop_hooks():
        handles = [bundle.language_model.register_forward_pre_hook(lambda m, a, k: None, with_kwargs=True)]
        handles += [bundle.layers[i].register_forward_hook(lambda m, a, o: None) for i in scorer.layers]
        return handles

    for _ in range(3):
        run_trunk()
        scorer.forward(inputs, left_padded=True)
    times: dict[str, list[float]] = {k: [] for k in ("a", "lm", "noop", "hooks", "forward", "readout")}
    for _ in range(args.repeats):
        t0 = clock()
        run_trunk()
        times["a"].append(clock() - t0)
        t0 = clock()
        run_lm()
        times["lm"].append(clock() - t0)
        handles = noop_hooks()
        try:
            t0 = clock()
            run_lm()
            times["noop"].append(clock() - t0)
        finally:
            for h in handles:
                h.remove()
        with scorer.holding_hooks():
            reader.left_padded = True
            try:
                t0 = clock()
                out = run_lm()
                times["hooks"].append(clock() - t0)
            finally:
                reader.left_padded = False
            t0 = clock()
            scorer.forward(inputs, left_padded=True)
            times["forward"].append(clock() - t0)
            real, scorer._trunk = scorer._trunk, Stored(out)
            try:
                scorer.forward(inputs, left_padded=True)  # the same readout again: warm
                t0 = clock()
                scorer.forward(inputs, left_padded=True)
                times["readout"].append(clock() - t0)
            finally:
                scorer._trunk = real
    base = statistics.median(times["a"])
    n_tokens = int(inputs["attention_mask"].sum())
    print(f"model {args.model}, batch {args.batch}, {n_tokens} tokens, {len(scorer.layers)} captured layers, "
          f"{args.repeats} rounds, torch {torch.__version__}, thread CPU time")
    print("\n| variant | us / call | vs a |")
    print("|---|---|---|")
    for key, label in (("a", "a: trunk only (floor)"), ("lm", "its language model alone"),
                       ("noop", "language model + no-op hooks"), ("hooks", "language model + the scorer's hooks"), ("forward", "b: scorer.forward"),
                       ("readout", "readout alone (stored trunk output, warm)")):
        t = statistics.median(times[key])
        print(f"| {label} | {t * 1e6:.1f} | {t / base:.3f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
