"""One study run twice on the same queries: the naive way against the project's way.

    python benchmarks/bench_study.py            # tiny-random, 24 toy test queries
    python benchmarks/bench_study.py --quick    # 12 queries, short fine-tune (< 2 minutes)
    python benchmarks/bench_study.py --model 7b-random --device cuda --mmsb-root .gpu/mm-safetybench \
        --queries 32 --mmsb-limit 48 --steps 10 --batch-size 16          # on a GPU (gpu_session.sh)

The study (issue 15): baseline, 6 defenses (two SR, one with a system prompt; a QR; two NI;
mo_finetune) and 4 ensembles of both kinds. Only the scoring is timed (the analysis after it is
the same work either way).

- naive: every condition independent, as a script without the toolkit's study would do it: a
  new defense object per condition (the fine-tune retrained, captions generated again), score-
  level ensembles ("a|b") scoring both members again, no pixel or feature cache, no prefetch,
  every noise variant of a query scored in full (``share_prefix=False``). Its fine-tunes train
  with the loss plain transformers computes, ``model(**batch).loss`` (full-vocabulary logits at
  every position), as mo_finetune did when issue 15 was filed (``--naive-loss plain``, the
  default); ``--naive-loss answer`` gives them the project's answer-only loss instead, so that the
  ratio shows the study's structure alone. Both losses are the same number and the same
  gradients (tests/test_defenses.py), so both ways train the same adapters and give the same
  tables.
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
from functools import partial
from pathlib import Path
from unittest import mock

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


def make_bundle(model: str, device: str, dtype: str):
    """A fresh copy of the benchmark's model: the same seeded weights each call, its own processor
    (so neither way finds prompts the other rendered)."""
    from probing import load_model

    if model == "7b-random":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_scorer import load_bench_model

        return load_bench_model(model, device, dtype, None)
    return load_model(model, seed=0, device=device, dtype=dtype)


def warm_up(bundle, queries, batch_size: int, device: str) -> None:
    """On an accelerator, one batch through the scorer first, so that neither way pays the
    device's start-up (CUDA context, cuBLAS, the vision tower's graphs) in its timed run."""
    if not device.startswith("cuda"):
        return
    from probing import RefusalScorer

    RefusalScorer(bundle, batch_size=batch_size, progress=False).score(queries[:batch_size])
    torch.cuda.synchronize(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="12 queries, 5 fine-tuning steps (under 2 minutes)")
    p.add_argument("--queries", type=int, default=24, help="toy test queries")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=30, help="mo_finetune steps")
    p.add_argument("--model", default="tiny-random", choices=["tiny-random", "7b-random"],
                   help="7b-random: the LLaVA-1.5-7B architecture with seeded random weights (a GPU run)")
    p.add_argument("--naive-loss", choices=["plain", "answer"], default="plain",
                   help="the naive way's training loss: plain = model(**batch).loss, what plain transformers and "
                        "mo_finetune before issue 15 compute; answer = the project's (labelled positions only), "
                        "to time the study's structure alone")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: float32 on the CPU, bfloat16 elsewhere")
    p.add_argument("--mmsb-root", default=None,
                   help="also MM-SafetyBench's tiny subset (SD, TYPO, SD_TYPO; images that are present)")
    p.add_argument("--mmsb-limit", type=int, default=None, help="the first N of those (stratified by label)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest |margin difference| between the ways (default 1e-4 in float32; in bfloat16 "
                        "the difference is reported, not checked: batching and prefix sharing round differently)")
    args = p.parse_args(argv)
    n, steps = (12, 5) if args.quick else (args.queries, args.steps)
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    tolerance = args.tolerance if args.tolerance is not None else (1e-4 if dtype == "float32" else None)
    torch.manual_seed(0)

    from experiments.study import load_datasets
    from experiments.study_config import StudyConfig

    datasets = [{"name": "toy", "tag": "toy", "limit": n}]
    if args.mmsb_root:
        datasets.append({"name": "mmsafetybench", "tag": "mmsb", "root": str(Path(args.mmsb_root).resolve()),
                         "kinds": ["SD", "TYPO", "SD_TYPO"], "subset": "tiny", "skip_missing": True,
                         **({"limit": args.mmsb_limit} if args.mmsb_limit else {})})
    queries, _ = load_datasets(datasets)  # the study's own loader: both ways score the same ids
    params = {"mo_finetune": {"steps": steps}}
    bundle = make_bundle(args.model, args.device, dtype)
    warm_up(bundle, queries, args.batch_size, args.device)
    counter = Counter()
    handle = bundle.language_model.register_forward_pre_hook(counter.hook, with_kwargs=True)
    import defenses.finetune as finetune
    from probing.training import answer_loss, causal_lm_loss

    # the naive way's fine-tunes train with its loss; the defense is unchanged (same identity, cache keys)
    naive_fit = partial(finetune.fit, loss_fn=causal_lm_loss if args.naive_loss == "plain" else answer_loss)
    t0 = time.perf_counter()
    with TuneTimer() as tune_naive, mock.patch.object(finetune, "fit", naive_fit):
        naive_tables = naive(bundle, queries, params, args.batch_size)
    sync(args.device)
    t_naive, rows_naive, tokens_naive = time.perf_counter() - t0, counter.rows, counter.tokens
    handle.remove()
    print(f"naive way: {t_naive:.1f} s ({tune_naive.seconds:.1f} s fine-tuning), {tokens_naive} inference tokens",
          flush=True)
    if args.device.startswith("cuda"):  # the study's copy of the model takes the place of this one
        del bundle
        torch.cuda.empty_cache()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = StudyConfig(model="tiny-random", out=str(Path(tmp) / "study"), defenses=list(DEFENSES),
                          ensembles=list(ENSEMBLES), datasets=datasets, device=args.device, dtype=dtype,
                          defense_params=params, batch_size=args.batch_size, generation_check=0)
        import experiments.study as study_mod

        counter2 = Counter()
        real_load = study_mod.load_model
        theirs = make_bundle(args.model, args.device, dtype)  # the study's own copy of the same model
        warm_up(theirs, queries, args.batch_size, args.device)
        theirs.language_model.register_forward_pre_hook(counter2.hook, with_kwargs=True)
        study_mod.load_model = lambda *a, **k: theirs
        try:
            t0 = time.perf_counter()
            with TuneTimer() as tune_proj:
                _, ours = project(cfg)
            sync(args.device)
            t_proj, rows_proj, tokens_proj = time.perf_counter() - t0, counter2.rows, counter2.tokens
        finally:
            study_mod.load_model = real_load

    diffs = {name: float((ours[name].select(table.ids).margin - table.margin).abs().max())
             for name, table in naive_tables.items()}
    worst = max(diffs.values())
    where = (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
             else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"machine: {where}, torch {torch.__version__}; model {args.model}, {dtype}; {len(queries)} queries "
          f"({', '.join(d['tag'] for d in datasets)}), {len(DEFENSES)} defenses, {len(ENSEMBLES)} ensembles, "
          f"mo_finetune steps={steps}, batch {args.batch_size}; naive training loss: {args.naive_loss}")
    print(f"{'way':<10} {'forward-equivalents':>20} {'per query':>10} {'inference tokens':>17} {'wall s':>8} "
          f"{'fine-tunings':>13} {'tuning s':>9} {'rest s':>7}")
    for way, rows, tokens, t, tune in (("naive", rows_naive, tokens_naive, t_naive, tune_naive),
                                       ("project", rows_proj, tokens_proj, t_proj, tune_proj)):
        print(f"{way:<10} {rows:>20} {rows / len(queries):>10.1f} {tokens:>17} {t:>8.1f} {tune.runs:>13} "
              f"{tune.seconds:>9.1f} {t - tune.seconds:>7.1f}")
    ok = tolerance is None or worst <= tolerance
    if tolerance is None:
        print(f"max |margin difference| between the ways: {worst:.2e} ({dtype}: reported, not checked); by "
              "condition: " + ", ".join(f"{k} {v:.2g}" for k, v in sorted(diffs.items(), key=lambda kv: -kv[1])))
        spread = [float(t.margin.std()) for t in naive_tables.values()]
        print(f"margin SD within a condition: {min(spread):.3g}-{max(spread):.3g}")
    else:
        print(f"same tables (max |margin difference| {worst:.2e}, tolerance {tolerance:g}): {'yes' if ok else 'NO'}")
    print(f"forward-equivalents saved: {rows_naive / max(rows_proj, 1):.2f}x; "
          f"inference tokens saved: {tokens_naive / max(tokens_proj, 1):.2f}x")
    print(f"speedup without fine-tuning: {(t_naive - tune_naive.seconds) / max(t_proj - tune_proj.seconds, 1e-9):.2f}x; "
          f"on fine-tuning: {tune_naive.seconds / max(tune_proj.seconds, 1e-9):.2f}x "
          f"({tune_naive.runs} fine-tunings against {tune_proj.runs})")
    print(f"study speedup: {t_naive / t_proj:.2f}x")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
