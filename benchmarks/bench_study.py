"""One study run twice on the same queries: the naive way against the project's way.

    python benchmarks/bench_study.py            # tiny-random, 24 toy test queries
    python benchmarks/bench_study.py --quick    # 12 queries, short fine-tune (< 2 minutes)

The study (issue 15): baseline, 6 defenses (two SR, one with a system prompt; a QR; two NI;
mo_finetune) and 4 ensembles of both kinds. Only the scoring is timed (the analysis after it is
the same work either way).

- naive: every condition independent, as a script without the toolkit's study would do it: a
  new defense object per condition (the fine-tune retrained, captions generated again), score-
  level ensembles ("a|b") scoring both members again, no pixel or feature cache, no prefetch,
  every noise variant of a query scored in full (``share_prefix=False``).
- project: `experiments.study.Study` in a fresh run directory: each distinct forward once
  (shards), composites reuse the study's defense instances (one fine-tune, cached captions),
  score-level ensembles combined from the members' finished tables, every condition that only
  changes the inputs (baseline, SR, QR, NI and their "+" composites) scored query-major, so rows
  that share a query's image and the tokens up to it run that prefix once, pixel
  and image-feature caches (each image through the vision tower once), shards that group
  text-only and image queries, and prefetch.

Forward-equivalents: query rows through the LLaVA trunk in scoring forwards and every generation
step, counted by a pre-hook on its language model (which every forward enters; the scorer calls it
directly for batches without pixels) (a fine-tuning trains a deep copy, whose copied hook
counts elsewhere: training is in the fine-tuning columns instead). A prefix-shared pass counts
its prefix rows and its (short) suffix rows alike, so the row count understates its saving;
inference tokens (rows x padded length, what the language model's compute grows with) show it.
Both ways must give the same tables (float32, 1e-4). The last line is ``study speedup: <x>``
(wall time, naive / project).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

DEFENSES = ["sr_self_reminder", "sr_mmsafety", "qr_caption", "ni_image_gaussian", "ni_text_smooth", "mo_finetune"]
ENSEMBLES = ["sr_self_reminder+mo_finetune", "sr_mmsafety+ni_image_gaussian", "qr_caption|sr_self_reminder",
             "mo_finetune|ni_text_smooth"]


class TuneTimer:
    """Seconds spent fine-tuning (`FineTune._tune`), so the table can show what is training and
    what is scoring: a way that trains k times is at most k times slower on the training part."""

    def __init__(self):
        self.seconds, self.runs = 0.0, 0

    def __enter__(self):
        from defenses.finetune import FineTune

        self._orig = FineTune._tune
        timer = self

        def timed(defense, bundle):
            t0 = time.perf_counter()
            try:
                return timer._orig(defense, bundle)
            finally:
                timer.seconds += time.perf_counter() - t0
                timer.runs += 1

        FineTune._tune = timed
        return self

    def __exit__(self, *exc):
        from defenses.finetune import FineTune

        FineTune._tune = self._orig


class Counter:
    """Query rows and token positions (padding included) through the trunk, by a forward pre-hook.
    A deep copy of the model (a fine-tuning) gets a copy of the counter, so training steps are not
    counted here."""

    def __init__(self):
        self.rows = 0
        self.tokens = 0

    def hook(self, _module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        x = ids if ids is not None else emb
        self.rows += int(x.shape[0])
        self.tokens += int(x.shape[0] * x.shape[1])


def naive(bundle, queries, params, batch_size):
    """Every condition on its own, nothing shared."""
    from defenses import get_defense
    from probing import RefusalScorer
    from probing.aggregate import OPERATORS
    from probing.plan import combine_tables

    def fresh_scorer():
        return RefusalScorer(bundle, batch_size=batch_size, progress=False, prefetch=0, pixel_cache=0,
                             feature_cache=0, share_prefix=False)

    def single(name):
        return fresh_scorer().score(queries, defense=get_defense(name, **params.get(name, {})),
                                    meta={"condition": name})

    tables = {"baseline": fresh_scorer().score(queries, meta={"condition": "baseline"})}
    for name in DEFENSES:
        tables[name] = single(name)
    for name in ENSEMBLES:
        op = "|" if "|" in name else "+"
        a, b = name.split(op)
        if op == "+":
            from defenses import Compose

            members = [get_defense(p, **params.get(p, {})) for p in (a, b)]
            tables[name] = fresh_scorer().score(queries, defense=Compose(members=members), meta={"condition": name})
        else:  # both members scored again, then combined
            tables[name] = combine_tables([single(a), single(b)], OPERATORS[op], {"condition": name})
    return tables


def project(cfg):
    from experiments.study import Study

    study = Study(cfg)
    try:
        study.score_shared_prefixes()  # what run_all does first: input-only conditions query-major
        return study, {name: study.table(name) for name in study.conditions}
    finally:
        study.run.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="12 queries, 10 fine-tuning steps")
    p.add_argument("--queries", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=30, help="mo_finetune steps")
    args = p.parse_args(argv)
    n, steps = (12, 10) if args.quick else (args.queries, args.steps)
    torch.manual_seed(0)

    from experiments.study_config import StudyConfig
    from probing import load_model
    from probing.datasets import toy

    queries = toy.requests("test")
    from experiments.study import stratified_head

    queries = stratified_head(queries, n)
    params = {"mo_finetune": {"steps": steps}}
    bundle = load_model("tiny-random", seed=0)
    counter = Counter()
    handle = bundle.language_model.register_forward_pre_hook(counter.hook, with_kwargs=True)
    t0 = time.perf_counter()
    with TuneTimer() as tune_naive:
        naive_tables = naive(bundle, queries, params, args.batch_size)
    t_naive, rows_naive, tokens_naive = time.perf_counter() - t0, counter.rows, counter.tokens
    handle.remove()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = StudyConfig(model="tiny-random", out=str(Path(tmp) / "study"), defenses=list(DEFENSES),
                          ensembles=list(ENSEMBLES), datasets=[{"name": "toy", "tag": "toy", "limit": n}],
                          defense_params=params, batch_size=args.batch_size, generation_check=0)
        import experiments.study as study_mod

        counter2 = Counter()
        real_load = study_mod.load_model

        def counted_load(*a, **k):  # the study loads its own copy of the same model: count it too
            b = real_load(*a, **k)
            b.language_model.register_forward_pre_hook(counter2.hook, with_kwargs=True)
            return b

        study_mod.load_model = counted_load
        try:
            t0 = time.perf_counter()
            with TuneTimer() as tune_proj:
                _, ours = project(cfg)
            t_proj, rows_proj, tokens_proj = time.perf_counter() - t0, counter2.rows, counter2.tokens
        finally:
            study_mod.load_model = real_load

    worst = 0.0
    for name, table in naive_tables.items():
        mine = ours[name].select(table.ids)
        worst = max(worst, float((mine.margin - table.margin).abs().max()))
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; {len(queries)} queries, {len(DEFENSES)} defenses, {len(ENSEMBLES)} ensembles, "
          f"mo_finetune steps={steps}")
    print(f"{'way':<10} {'forward-equivalents':>20} {'per query':>10} {'inference tokens':>17} {'wall s':>8} "
          f"{'fine-tunings':>13} {'tuning s':>9} {'rest s':>7}")
    for way, rows, tokens, t, tune in (("naive", rows_naive, tokens_naive, t_naive, tune_naive),
                                       ("project", rows_proj, tokens_proj, t_proj, tune_proj)):
        print(f"{way:<10} {rows:>20} {rows / len(queries):>10.1f} {tokens:>17} {t:>8.1f} {tune.runs:>13} "
              f"{tune.seconds:>9.1f} {t - tune.seconds:>7.1f}")
    ok = worst <= 1e-4
    print(f"same tables (max |margin difference| {worst:.2e}, tolerance 1e-4): {'yes' if ok else 'NO'}")
    print(f"forward-equivalents saved: {rows_naive / max(rows_proj, 1):.2f}x; "
          f"inference tokens saved: {tokens_naive / max(tokens_proj, 1):.2f}x")
    print(f"speedup without fine-tuning: {(t_naive - tune_naive.seconds) / max(t_proj - tune_proj.seconds, 1e-9):.2f}x; "
          f"on fine-tuning: {tune_naive.seconds / max(tune_proj.seconds, 1e-9):.2f}x "
          f"({tune_naive.runs} fine-tunings against {tune_proj.runs})")
    print(f"study speedup: {t_naive / t_proj:.2f}x")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
