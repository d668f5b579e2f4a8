"""GPU checks of issue 15, prepared for a lent accelerator: the scorer's MFU by attention path,
and the whole study's GPU busy fraction. LLaVA-1.5-7B architecture, random bf16 weights, the real
processor (576 image tokens a query).

Part 1, MFU by attention path: the fused scorer as `score` runs it (hooks held, left-padded read)
at each batch size under every attention implementation available here (``sdpa``, ``eager``, and
``flash_attention_2`` when flash-attn is installed); with ``--compile`` also ``sdpa`` with the
language model compiled in place (``torch.compile``). MFU as in bench_gpu.py (prefill FLOPs over
real tokens / time / the card's peak bf16 FLOP/s).

Part 2, the study's busy fraction: `experiments.study.Study` over toy test queries (and, with
``--mmsb-root``, MM-SafetyBench's image queries at their 1024 px, where image processing costs most)
with the baseline, two SR defenses (one with a system prompt), `qr_caption`, `ni_image_gaussian`,
`ni_text_smooth` and two ensembles (`mo_finetune` left out: its training at 7B alone outlasts a
device session). Run twice in fresh run directories: once for the wall time, once under
torch.profiler for the kernel time (the union of all kernel intervals, so overlapping streams
count once). Busy fraction = kernel time / unprofiled wall time (goal >= 0.90). ``--study-runs N``
times N unprofiled runs first (a fresh process's first is cold); ``--extra-study-batches 32``
times the study once more at other batch sizes. Each run prints `Study.timings`: the up-front
generation, the waits for the plan-ahead worker, for prepared batches and for the shard writer,
and NVML's busy share during the generation and during the scoring. The profiled run also marks
the study's host steps (`annotated`: `record_function` ranges, patched in for that run only) and
prints the device's idle gaps by length and by the step the host was in (`gap_report`).
``--sync-report`` runs the study once more under `torch.cuda.set_sync_debug_mode("warn")` and
prints its synchronizing CUDA calls by site (`counting_syncs`: each makes the host wait until
the device is idle). Before the study, `check_late_copies` compares `score`'s results copied to the host one batch late
with copies made at once (must be 0).

``--decode-check`` first compares, on the 7B model in bf16 and on a 4-layer one in float32,
greedy decoding replayed from a CUDA graph (`probing.decode`) with the same steps run eagerly and
with transformers' `generate` (static and dynamic cache; tokens, determinism, time), and the vision
tower replayed from graphs with the eager one (`check_vision`: bits and time). ``--ab-graphs`` times
the study once more with ``MECHPROBE_CUDA_GRAPHS=0``, then with graphs again; ``--switch-interval S``
once more with that GIL switch interval.

``--cprofile PATH`` runs the second study under cProfile instead of torch.profiler and prints
where the host time goes; ``--study-compiled`` then compiles the language model and runs the
study twice more (the first run includes compilation). Results of the H200 runs: docs/
performance.md §2b.

Part 3 (``--compile``), last because it compiles the language model in place: ``sdpa`` compiled,
skipped when less than ``--compile-budget`` seconds remain of ``--deadline``. Results are written to
``--json`` after every part, so a run stopped at its limit still reports what it finished.

    python benchmarks/gpu_study.py --compile --mmsb-root .gpu/mm-safetybench   # on a GPU
    python benchmarks/gpu_study.py --model tiny-random --device cpu --dtype float32 \\
        --batch-sizes 2 --queries 4 --repeats 1                          # the CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from bench_gpu import peak_flops, prefill_flops  # noqa: E402
from bench_scorer import _sync, load_bench_model, make_inputs  # noqa: E402

STUDY_DEFENSES = ["sr_self_reminder", "sr_mmsafety", "qr_caption", "ni_image_gaussian", "ni_text_smooth"]
STUDY_ENSEMBLES = ["sr_mmsafety+ni_image_gaussian", "qr_caption|sr_self_reminder"]


def attention_paths() -> list[str]:
    paths = ["sdpa", "eager"]
    try:
        import flash_attn  # noqa: F401

        paths.append("flash_attention_2")
    except ImportError:
        pass
    return paths


def time_scorer(bundle, batch: int, repeats: int, device: str) -> tuple[float, float]:
    """Median seconds per batch of the scorer's hot path, and the batch's prefill FLOPs."""
    scorer, inputs = make_inputs(bundle, batch)
    left = bool(inputs["attention_mask"][:, -1].all())
    times = []
    with scorer.holding_hooks():
        for rep in range(repeats + 1):  # the first is warm-up
            _sync(device)
            t0 = time.perf_counter()
            scorer.forward(inputs, left_padded=left)
            _sync(device)
            if rep:
                times.append(time.perf_counter() - t0)
    return statistics.median(times), prefill_flops(bundle, inputs)


def mfu_rows(bundle, batches: list[int], repeats: int, device: str, peak: float, compiled_only: bool = False,
             paths: list[str] | None = None) -> list[dict]:
    rows = []
    runs = [("sdpa", True)] if compiled_only else [(attn, False) for attn in (paths or attention_paths())]
    for attn, compiled in runs:
        try:
            bundle.model.set_attn_implementation(attn)
            if compiled:
                bundle.language_model.compile()
        except Exception as exc:  # noqa: BLE001 -- a path this machine lacks is a table row, not a crash
            rows.append({"attn": attn, "compile": compiled, "error": f"{type(exc).__name__}: {exc}"})
            continue
        for batch in batches:
            try:
                t, flops = time_scorer(bundle, batch, repeats, device)
            except torch.OutOfMemoryError:
                rows.append({"attn": attn, "compile": compiled, "batch": batch, "error": "out of memory"})
                torch.cuda.empty_cache()
                continue
            rows.append({"attn": attn, "compile": compiled, "batch": batch, "s": t, "queries_s": batch / t,
                         "tflops": flops / t / 1e12, "mfu": flops / t / peak})
            print(f"{attn:<18} compile={compiled!s:<5} batch {batch:>3}: {t:.4f} s  MFU {flops / t / peak:.1%}",
                  flush=True)
    bundle.model.set_attn_implementation("sdpa")
    return rows


def kernel_seconds(prof) -> float:
    """Union of the device activity intervals (kernels, copies) of a profile, in seconds. Read from
    the raw kineto events: building the profiler's FunctionEvent tree for a whole study takes minutes."""
    from torch.autograd import DeviceType

    marks = annotation_labels()  # record_function ranges are mirrored on the device timeline: not kernels
    spans = sorted((e.start_ns(), e.start_ns() + e.duration_ns()) for e in prof.profiler.kineto_results.events()
                   if e.device_type() == DeviceType.CUDA and e.name() not in marks)
    total, end = 0, None
    for a, b in spans:
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total / 1e9


#: host-side ranges marked in the profiled study (`annotated`): what the host was doing in each
#: device gap
ANNOTATED = [("experiments.study", "Study", "prepare_generations"), ("experiments.study", "Study", "_score_query_major"),
             ("experiments.study", "Study", "_chunk_inputs"), ("experiments.runs", "RunDir", "store_shard"),
             ("experiments.runs", "RunDir", "_load_shard"), ("experiments.plan_ahead", "PlanAhead", "take"),
             ("probing.scorer", "RefusalScorer", "score"), ("probing.scorer", "RefusalScorer", "forward"),
             ("probing.pipeline", "Prefetcher", "_get"), ("probing.pipeline", "HostResults", "flush"),
             ("probing.prefix", None, "score_prefixed"), ("probing.prefix", None, "_tokens"),
             ("probing.scorer", None, "prompt_lengths"), ("probing.plan", None, "fold_table"),
             ("experiments.shard_writer", "ShardWriter", "flush"), ("probing.pipeline", None, "to_device"),
             ("probing.pipeline", None, "cached_image_inputs"), ("probing.pipeline", None, "image_features"),
             ("probing.pipeline", "HostResults", "add"), ("probing.generation", None, "map_threads"),
             ("probing.generation", None, "encode_pixels"), ("probing.generation", None, "greedy_decode"),
             ("transformers.generation.utils", "GenerationMixin", "generate"),
             ("transformers.models.llava.modeling_llava", "LlavaModel", "forward")]


def annotation_labels() -> set[str]:
    return {f"{c or m.rsplit('.', 1)[-1]}.{a}" for m, c, a in ANNOTATED}


@contextlib.contextmanager
def annotated():
    """`torch.profiler.record_function` ranges around the study's host steps (`ANNOTATED`), for
    `gap_report`; undone on exit."""
    import functools
    import importlib
    import inspect

    undo = []
    try:
        for module_name, cls_name, attr in ANNOTATED:
            module = importlib.import_module(module_name)
            owner = getattr(module, cls_name) if cls_name else module
            real = getattr(owner, attr)
            label = f"{cls_name or module_name.rsplit('.', 1)[-1]}.{attr}"

            def wrap(fn, label=label):
                @functools.wraps(fn)
                def marked(*a, **k):
                    with torch.profiler.record_function(label):
                        return fn(*a, **k)
                return marked

            static = cls_name is not None and isinstance(inspect.getattr_static(owner, attr), staticmethod)
            setattr(owner, attr, staticmethod(wrap(real)) if static else wrap(real))
            undo.append((owner, attr, staticmethod(real) if static else real))
            if cls_name is None:  # also where it was imported by name
                for other in ("probing.prefix", "probing.scorer", "experiments.study", "probing.plan",
                              "probing.pipeline", "probing.generation"):
                    m = importlib.import_module(other)
                    if getattr(m, attr, None) is real:
                        setattr(m, attr, getattr(owner, attr))
                        undo.append((m, attr, real))
        yield
    finally:
        for owner, attr, real in reversed(undo):
            setattr(owner, attr, real)


def gap_report(prof, min_gap_ms: float = 0.5, top: int = 12) -> list[str]:
    """Device idle time between kernels, by gap size, and by the `annotated` ranges the main thread
    was in at each gap's middle (outermost > innermost), for the gaps of ``min_gap_ms`` and more
    and, separately, for the shorter ones (kernel-launch gaps inside forwards)."""
    from torch.autograd import DeviceType

    events = list(prof.profiler.kineto_results.events())
    labels = annotation_labels()
    spans = sorted((e.start_ns(), e.start_ns() + e.duration_ns()) for e in events
                   if e.device_type() == DeviceType.CUDA and e.name() not in labels)
    marks = [e for e in events if e.device_type() == DeviceType.CPU and e.name() in labels]
    main = next((e.start_thread_id() for e in marks if e.name() == "Study._score_query_major"), None)
    # the main thread's ranges nest: sweep their boundaries in time order with a stack
    bounds = sorted([(e.start_ns(), 1, e.name()) for e in marks if e.start_thread_id() == main]
                    + [(e.start_ns() + e.duration_ns(), 0, e.name()) for e in marks if e.start_thread_id() == main])
    merged = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    by_size = {"<0.5 ms": [0, 0.0], "0.5-5 ms": [0, 0.0], "5-50 ms": [0, 0.0], ">=50 ms": [0, 0.0]}
    big: dict[str, list] = {}
    small: dict[str, list] = {}
    stack: list[str] = []
    k = 0
    for (_, end), (start, _) in zip(merged, merged[1:]):  # gaps come in time order: advance the sweep
        gap = (start - end) / 1e6
        key = "<0.5 ms" if gap < 0.5 else "0.5-5 ms" if gap < 5 else "5-50 ms" if gap < 50 else ">=50 ms"
        by_size[key][0] += 1
        by_size[key][1] += gap / 1e3
        mid = (start + end) / 2
        while k < len(bounds) and bounds[k][0] <= mid:
            _, opening, name = bounds[k]
            if opening:
                stack.append(name)
            elif name in stack:
                del stack[len(stack) - 1 - stack[::-1].index(name)]
            k += 1
        entry = (big if gap >= min_gap_ms else small).setdefault(" > ".join(stack) or "(none)", [0, 0.0])
        entry[0] += 1
        entry[1] += gap / 1e3
    lines = ["device gaps by size: " + "; ".join(f"{k}: {n} gaps, {s:.2f} s" for k, (n, s) in by_size.items())]
    if merged:
        lines.append(f"first kernel to last: {(merged[-1][1] - merged[0][0]) / 1e9:.1f} s")
    for title, table in ((f"gaps >= {min_gap_ms} ms", big), (f"gaps < {min_gap_ms} ms", small)):
        lines.append(f"{title} by what the main thread was in (outermost > innermost):")
        for label, (n, sec) in sorted(table.items(), key=lambda kv: -kv[1][1])[:top]:
            lines.append(f"  {sec:6.2f} s in {n:6d} gaps: {label}")
    return lines


@contextlib.contextmanager
def counting_syncs():
    """Count the synchronizing CUDA calls made in the block (`torch.cuda.set_sync_debug_mode`
    "warn": a blocking copy, ``.item()``, a ``bool`` of a device tensor ...), by where they were
    made: the innermost frame of this project and the innermost frame outside torch. Yields a
    Counter filled as the block runs. Each such call makes the host wait until the device has run
    everything queued, so the device then idles until the host has queued new work."""
    import collections
    import traceback
    import warnings

    root = str(Path(__file__).resolve().parents[1]) + os.sep
    counts: collections.Counter = collections.Counter()

    def where(stack) -> str:
        ours = [f for f in stack if f.filename.startswith(root) and os.sep + "benchmarks" + os.sep not in f.filename]
        outside = [f for f in stack if os.sep + "torch" + os.sep not in f.filename and "warnings" not in f.filename]
        parts = []
        for f in (ours[-1] if ours else None, outside[-1] if outside else None):
            if f is not None:
                text = f"{f.filename.replace(root, '').split('site-packages' + os.sep)[-1]}:{f.lineno} {f.name}"
                if text not in parts:
                    parts.append(text)
        return " | ".join(parts) or "(unknown)"

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        real_show = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message):
                counts[where(traceback.extract_stack()[:-1])] += 1
            else:
                real_show(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield counts
        finally:
            torch.cuda.set_sync_debug_mode("default")


class UtilizationSampler:
    """NVML's GPU utilization (the share of its sample window in which a kernel ran) read every
    `period` seconds in a thread; the mean over a run is a second, profiler-free busy fraction."""

    def __init__(self, period: float = 0.05):
        import threading

        self.period, self.samples, self.times = period, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.samples.append(torch.cuda.utilization())
                self.times.append(time.perf_counter())
            except Exception:  # noqa: BLE001 -- no NVML here: no second measure
                return

    def mean_within(self, spans: list[tuple[float, float]], inside: bool = True) -> float | None:
        """Mean utilization of the samples taken inside (or outside) the ``(start, end)`` spans."""
        got = [u for t, u in zip(self.times, self.samples) if any(a <= t <= b for a, b in spans) == inside]
        return statistics.fmean(got) / 100 if got else None

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.samples) / 100 if self.samples else None


def study_datasets(n_queries: int, mmsb_root: str | None) -> list[dict]:
    datasets = [{"name": "toy", "tag": "toy", "limit": n_queries}]
    if mmsb_root:
        datasets.append({"name": "mmsafetybench", "tag": "mmsb", "root": str(Path(mmsb_root).resolve()),
                         "kinds": ["SD", "TYPO", "SD_TYPO"], "subset": "tiny", "skip_missing": True})
    return datasets


def study_once(bundle, datasets: list[dict], batch: int, device: str, profiled: bool, cprofile: str | None = None,
               syncs: dict | None = None) -> tuple[float, float | None, int, float | None, dict]:
    """Wall seconds of one study's scoring, its device-busy seconds (profiled runs), its query count,
    NVML's mean utilization (unprofiled runs on a GPU) and the study's host timings (up-front
    generation, waiting for plans built ahead, plans built in the main thread). ``syncs``: a dict
    that receives the run's synchronizing CUDA calls by site (`counting_syncs`)."""
    import experiments.study as study_mod
    from experiments.study_config import StudyConfig

    real_load = study_mod.load_model
    study_mod.load_model = lambda *a, **k: bundle  # the study scores the model built here
    real_prepare = study_mod.Study.prepare_generations
    spans: list[tuple[float, float]] = []

    def timed_prepare(self, names):  # when the up-front generation ran, to split NVML's samples
        t0 = time.perf_counter()
        try:
            return real_prepare(self, names)
        finally:
            spans.append((t0, time.perf_counter()))

    study_mod.Study.prepare_generations = timed_prepare
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = StudyConfig(model="tiny-random", out=str(Path(tmp) / "study"), defenses=list(STUDY_DEFENSES),
                              ensembles=list(STUDY_ENSEMBLES), datasets=datasets,
                              batch_size=batch, generation_check=0)
            study = study_mod.Study(cfg)
            try:
                activities = [torch.profiler.ProfilerActivity.CPU]
                if device.startswith("cuda"):
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                prof = torch.profiler.profile(activities=activities) if profiled else None
                sampler = UtilizationSampler() if device.startswith("cuda") and not profiled else None
                py_prof = None
                if cprofile:
                    import cProfile

                    py_prof = cProfile.Profile()
                with contextlib.ExitStack() as stack:
                    for ctx in (prof, sampler):
                        if ctx is not None:
                            stack.enter_context(ctx)
                    if py_prof is not None:
                        py_prof.enable()
                        stack.callback(py_prof.disable)
                    if profiled:
                        stack.enter_context(annotated())
                    if syncs is not None:
                        stack.callback(lambda counts: syncs.update(counts), stack.enter_context(counting_syncs()))
                    _sync(device)
                    t0 = time.perf_counter()
                    study.score_shared_prefixes()
                    for name in study.conditions:
                        study.table(name)
                    _sync(device)
                    wall = time.perf_counter() - t0
                if py_prof is not None:
                    py_prof.dump_stats(cprofile)
                kernels = kernel_seconds(prof) if prof is not None and device.startswith("cuda") else None
                if prof is not None:
                    try:
                        for line in gap_report(prof):
                            print(line, flush=True)
                    except Exception as exc:  # noqa: BLE001 -- a diagnostic; the measurements stand
                        print(f"gap report failed: {type(exc).__name__}: {exc}", flush=True)
                timings = dict(study.timings)
                if sampler is not None and sampler.samples:
                    timings["nvml_generation"] = sampler.mean_within(spans)
                    timings["nvml_scoring"] = sampler.mean_within(spans, inside=False)
                return (wall, kernels, len(study.queries), sampler.mean if sampler is not None else None, timings)
            finally:
                study.run.close()
    finally:
        study_mod.load_model = real_load
        study_mod.Study.prepare_generations = real_prepare


def fmt_timings(t: dict) -> str:
    def busy(key):
        return "n/a" if t.get(key) is None else f"{t[key]:.2f}"

    return (f"generation {t['generation_s']:.1f} s (NVML busy {busy('nvml_generation')}; scoring "
            f"{busy('nvml_scoring')}), waited for plans {t['plan_wait_s']:.1f} s, plans inline "
            f"{t['plan_inline_s']:.1f} s, fallbacks {t['plan_fallbacks']}, waited for prepared batches "
            f"{t['data_wait_s']:.1f} s, waited for the shard writer {t.get('store_wait_s', 0.0):.1f} s")


def check_late_copies(bundle, n: int = 24, batch: int = 8) -> float:
    """`score` copies each batch's results to the host one batch late (`probing.pipeline.HostResults`,
    non-blocking on CUDA): the largest |difference| from the same run with every copy made at
    once (the same batches and kernels, so it must be 0)."""
    import probing.pipeline as pipeline
    from probing import RefusalScorer
    from probing.datasets import toy

    queries = toy.requests("test")[:n]
    scorer = RefusalScorer(bundle, batch_size=batch, progress=False, pixel_cache=0, feature_cache=0)
    late = scorer.score(queries)
    real_add = pipeline.HostResults.add

    def at_once(self, *a):
        real_add(self, *a)
        self.flush()

    pipeline.HostResults.add = at_once
    try:
        now = scorer.score(queries)
    finally:
        pipeline.HostResults.add = real_add
    return max(float((late.margin - now.margin).abs().max()), float((late.lens_margin - now.lens_margin).abs().max()))


def check_decode(bundle, n: int = 64, new_tokens: int = 32, device: str = "cuda") -> dict:
    """`probing.decode.greedy_decode` on ``n`` image queries in one batch: its CUDA-graph replay
    against the same steps run eagerly (the same kernels: the tokens should be equal) and against
    transformers' `generate` with its static cache (the same computation) and its default dynamic
    cache (attention over the unpadded cache: low-precision sums may round differently), each run
    twice (is it deterministic?), with the second run's wall time. ``first_diff_*``: the first
    new-token column where the graph's tokens differ from the other's in any row (None: equal)."""
    from bench_scorer import make_queries

    from probing import PromptSpec
    from probing.decode import graph_obstacle, greedy_decode
    from probing.pipeline import process_image
    from probing.render import encode_pixels, render_prompt

    queries = make_queries(n)
    prompts = [render_prompt(bundle.processor, q, PromptSpec()) for q in queries]
    inputs = encode_pixels(bundle, prompts, [process_image(bundle, q.load_image()) for q in queries])
    pad = bundle.tokenizer.pad_token_id
    plain = {k: v for k, v in inputs.items() if k != "position_ids"}
    seq = inputs["input_ids"].shape[1]
    graphed = []

    def graph_run():
        got = greedy_decode(bundle.model, inputs, new_tokens, pad, graphs=True)
        graphed.append(got.graphed)
        return got.tokens

    runs = {
        "generate": lambda: bundle.model.generate(**plain, max_new_tokens=new_tokens, do_sample=False,
                                                  pad_token_id=pad)[:, seq:].cpu(),
        "generate_static": lambda: bundle.model.generate(**plain, max_new_tokens=new_tokens, do_sample=False,
                                                         pad_token_id=pad, cache_implementation="static",
                                                         disable_compile=True)[:, seq:].cpu(),
        "eager": lambda: greedy_decode(bundle.model, inputs, new_tokens, pad).tokens,
        "graphed": graph_run,
    }
    out: dict = {"model": bundle.name, "dtype": str(bundle.dtype), "queries": n, "new_tokens": new_tokens,
                 "obstacle": graph_obstacle(bundle.model)}
    tokens = {}
    with torch.inference_mode():
        for name, fn in runs.items():
            got = []
            for _ in range(2):  # the first is also the warm-up
                _sync(device)
                t0 = time.perf_counter()
                got.append(fn())
                _sync(device)
                out[f"{name}_s"] = time.perf_counter() - t0
            out[f"{name}_deterministic"] = bool(torch.equal(got[0], got[1]))
            tokens[name] = got[-1]
    out["graphed"] = all(graphed)
    g = tokens["graphed"]
    for name in ("eager", "generate_static", "generate"):
        other = tokens[name]
        width = min(g.shape[1], other.shape[1])
        same = g[:, :width] == other[:, :width]
        cols = (~same).any(0).nonzero()
        out[f"first_diff_{name}"] = int(cols[0]) if len(cols) else None
        out[f"rows_equal_{name}"] = float(same.all(1).float().mean())
        out[f"tokens_equal_{name}"] = float(same.float().mean())
    return out


def check_vision(bundle, sizes=(1, 7, 16), repeats: int = 5) -> list[dict]:
    """`probing.pipeline.image_features` replayed from CUDA graphs against the eager vision tower
    (``MECHPROBE_CUDA_GRAPHS=0``) on random pixels: bitwise equality, max |difference|, whether
    each way repeats itself, and the median seconds per call."""
    import probing.pipeline as pipeline
    from probing.cuda_graphs import ENV

    rows = []
    gen = torch.Generator(device=bundle.input_device).manual_seed(0)
    for n in sizes:
        x = torch.randn(n, 3, 336, 336, generator=gen, device=bundle.input_device).to(bundle.dtype)
        got = {}
        for mode in ("0", "1"):
            os.environ[ENV] = mode
            outs, times = [], []
            with torch.inference_mode():
                for _ in range(repeats + 1):
                    _sync("cuda")
                    t0 = time.perf_counter()
                    outs.append(torch.stack(pipeline.image_features(bundle.model, x)))
                    _sync("cuda")
                    times.append(time.perf_counter() - t0)
            got[mode] = (outs, statistics.median(times[1:]))
        os.environ[ENV] = "1"
        eager, graph = got["0"][0], got["1"][0]
        rows.append({"model": bundle.name, "dtype": str(bundle.dtype), "images": n,
                     "equal": bool(torch.equal(eager[-1], graph[-1])),
                     "max_abs_diff": float((eager[-1].float() - graph[-1].float()).abs().max()),
                     "eager_repeats": all(torch.equal(eager[0], o) for o in eager),
                     "graph_repeats": all(torch.equal(graph[0], o) for o in graph),
                     "eager_s": got["0"][1], "graph_s": got["1"][1]})
        r = rows[-1]
        print(f"vision tower ({r['model']}, {r['dtype']}), {n} images: eager {r['eager_s'] * 1e3:.1f} ms, graph "
              f"{r['graph_s'] * 1e3:.1f} ms; equal {r['equal']} (max |diff| {r['max_abs_diff']:.1e}); repeats: "
              f"eager {r['eager_repeats']}, graph {r['graph_repeats']}", flush=True)
    return rows


def graph_counts(bundle) -> str:
    import probing.pipeline as pipeline

    g = pipeline._VISION_GRAPHS.get(bundle.model)
    return "no vision graphs" if g is None else (f"vision tower: {len(g)} graphs, {g.replays} replays, "
                                                 f"{g.eager_calls} eager calls")


def print_decode(d: dict) -> None:
    print(f"\ndecode ({d['model']}, {d['dtype']}), {d['queries']} image queries x {d['new_tokens']} tokens in one "
          f"batch: generate {d['generate_s']:.2f} s, generate static {d['generate_static_s']:.2f} s, eager "
          f"{d['eager_s']:.2f} s, CUDA graph {d['graphed_s']:.2f} s (graphed: {d['graphed']}, obstacle: "
          f"{d['obstacle']}); deterministic: " + ", ".join(f"{k} {d[f'{k}_deterministic']}" for k in
                                                         ("generate", "generate_static", "eager", "graphed")),
          flush=True)
    for name in ("eager", "generate_static", "generate"):
        print(f"  graph vs {name}: first differing column {d[f'first_diff_{name}']}, rows equal "
              f"{d[f'rows_equal_{name}']:.2f}, tokens equal {d[f'tokens_equal_{name}']:.2f}", flush=True)


def print_mfu_table(rows: list[dict]) -> None:
    print("\n| attention | compiled | batch | s / batch | queries/s | TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['attn']} | {r['compile']} | {r.get('batch', '-')} | {r['error']} | | | |")
        else:
            print(f"| {r['attn']} | {r['compile']} | {r['batch']} | {r['s']:.4f} | {r['queries_s']:.1f} | "
                  f"{r['tflops']:.1f} | {r['mfu']:.1%} |")


def main(argv=None) -> int:
    started = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="7b-random")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--n-layers", type=int, default=None)
    p.add_argument("--batch-sizes", default="8,16,32,64")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also time sdpa with the language model compiled (last)")
    p.add_argument("--queries", type=int, default=48, help="toy test queries in the study")
    p.add_argument("--mmsb-root", default=None,
                   help="an MM-SafetyBench root: its tiny-subset image queries join the study")
    p.add_argument("--study-batch", type=int, default=16)
    p.add_argument("--study-runs", type=int, default=1,
                   help="unprofiled study runs before the profiled one (the first on a fresh process is cold)")
    p.add_argument("--extra-study-batches", default="",
                   help="comma-separated study batch sizes to time once more each, unprofiled, at the end")
    p.add_argument("--skip-mfu", action="store_true")
    p.add_argument("--attention", default=None, help="comma-separated attention paths (default: all available)")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--deadline", type=float, default=400.0, help="seconds from start; --compile is skipped past it")
    p.add_argument("--compile-budget", type=float, default=150.0, help="seconds --compile needs before the deadline")
    p.add_argument("--json", default=None)
    p.add_argument("--study-compiled", action="store_true",
                   help="then compile the language model (as `load_model(compile=True)` does) and run the study "
                        "twice more: the first includes compilation, the second is warm")
    p.add_argument("--sync-report", action="store_true",
                   help="after the timed runs, run the study once more counting its synchronizing CUDA calls by "
                        "site (torch.cuda.set_sync_debug_mode)")
    p.add_argument("--switch-interval", type=float, default=None,
                   help="after the profiled run, time the study once more with this GIL switch interval "
                        "(seconds; sys.setswitchinterval, restored after)")
    p.add_argument("--ab-graphs", action="store_true", help="then time the study with MECHPROBE_CUDA_GRAPHS=0, "
                   "and with graphs again")
    p.add_argument("--decode-check", action="store_true", help="first check decoding and the vision tower "
                   "replayed from CUDA graphs against eager runs and transformers' generate (see above)")
    p.add_argument("--cprofile", default=None, help="run the study a second time under cProfile (not the "
                   "torch profiler), dump the stats here and print where the host time goes")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    result: dict = {"args": vars(args)}

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1, default=str))

    t0 = time.perf_counter()
    bundle = load_bench_model(args.model, args.device, args.dtype, args.n_layers)
    image_processor = type(getattr(bundle.processor, "image_processor", None)).__name__
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    peak = peak_flops(args.device, args.peak_tflops)
    result.update(model=bundle.name, device=device_name, torch=torch.__version__, image_processor=image_processor,
                  load_s=time.perf_counter() - t0)
    print(f"model {bundle.name}, {args.dtype}, {device_name}, torch {torch.__version__}, image processor "
          f"{image_processor}, built in {result['load_s']:.1f} s", flush=True)
    save()

    rows = [] if args.skip_mfu else mfu_rows(bundle, [int(b) for b in args.batch_sizes.split(",")],
                                            args.repeats, args.device, peak,
                                            paths=args.attention.split(",") if args.attention else None)
    result["mfu"] = rows
    save()
    print_mfu_table(rows)

    if args.decode_check and args.device.startswith("cuda"):
        d = check_decode(bundle, device=args.device)
        result["decode"] = [d]
        save()
        print_decode(d)
        # float32 (no TF32) at 4 layers: rounding too small to flip an argmax, so any difference is a bug
        small = load_bench_model(args.model, args.device, "float32", 4)
        d = check_decode(small, n=32, new_tokens=24, device=args.device)
        result["vision"] = check_vision(small) + check_vision(bundle)
        del small
        torch.cuda.empty_cache()
        result["decode"].append(d)
        save()
        print_decode(d)
    late = check_late_copies(bundle)
    result["late_copies_max_diff"] = late
    print(f"results copied to the host one batch late vs at once: max |difference| {late:.1e} (must be 0)",
          flush=True)
    datasets = study_datasets(args.queries, args.mmsb_root)
    for run in range(args.study_runs):
        wall, _, n, nvml, timings = study_once(bundle, datasets, args.study_batch, args.device, profiled=False)
        result.setdefault("study_runs", []).append({"wall_s": wall, "nvml_busy": nvml, **timings})
        result["study"] = {"queries": n, "wall_s": wall, "nvml_busy": nvml, **timings}
        save()
        print(f"\nstudy run {run + 1}: {n} queries ({', '.join(d['tag'] for d in datasets)}), {len(STUDY_DEFENSES)} "
              f"defenses, {len(STUDY_ENSEMBLES)} ensembles, batch {args.study_batch}: wall {wall:.1f} s, NVML mean "
              f"utilization {'n/a' if nvml is None else f'{nvml:.2f}'}; host: {fmt_timings(timings)}", flush=True)
    if args.device.startswith("cuda"):
        print(graph_counts(bundle), flush=True)
    if args.ab_graphs and args.device.startswith("cuda"):
        from probing.cuda_graphs import ENV

        os.environ[ENV] = "0"
        try:
            w, _, _, u, t = study_once(bundle, datasets, args.study_batch, args.device, profiled=False)
        finally:
            os.environ[ENV] = "1"
        result["study_without_graphs"] = {"wall_s": w, "nvml_busy": u, **t}
        save()
        print(f"study without CUDA graphs ({ENV}=0): wall {w:.1f} s, NVML mean utilization "
              f"{'n/a' if u is None else f'{u:.2f}'}; host: {fmt_timings(t)}", flush=True)
        w, _, _, u, t = study_once(bundle, datasets, args.study_batch, args.device, profiled=False)
        result["study_with_graphs_again"] = {"wall_s": w, "nvml_busy": u, **t}
        save()
        print(f"study with CUDA graphs again: wall {w:.1f} s, NVML mean utilization "
              f"{'n/a' if u is None else f'{u:.2f}'}; host: {fmt_timings(t)}; {graph_counts(bundle)}", flush=True)
    if args.sync_report and args.device.startswith("cuda"):
        sites: dict = {}
        w, _, _, _, _ = study_once(bundle, datasets, args.study_batch, args.device, profiled=False, syncs=sites)
        result["syncs"] = dict(sorted(sites.items(), key=lambda kv: -kv[1]))
        save()
        print(f"\nsynchronizing CUDA calls in one study run ({w:.1f} s wall under the sync debug mode): "
              f"{sum(sites.values())} at {len(sites)} sites", flush=True)
        for site, n in sorted(sites.items(), key=lambda kv: -kv[1])[:24]:
            print(f"  {n:6d}  {site}", flush=True)
    if args.study_compiled:
        bundle.language_model.compile()
        for label in ("compiled, first (compiles)", "compiled, warm"):
            w, _, _, u, _ = study_once(bundle, datasets, args.study_batch, args.device, profiled=False)
            result.setdefault("study_compiled", []).append({"run": label, "wall_s": w, "nvml_busy": u})
            save()
            print(f"study {label}: wall {w:.1f} s, NVML mean utilization {'n/a' if u is None else f'{u:.2f}'}",
                  flush=True)
    left = args.deadline - (time.perf_counter() - started)
    if left < 2 * wall + 30:
        print(f"profiled study skipped: {left:.0f} s left of the deadline", flush=True)
        wall_p, kernels = float("nan"), None
    elif args.cprofile:
        wall_p, kernels, _, _, _ = study_once(bundle, datasets, args.study_batch, args.device, profiled=False,
                                              cprofile=args.cprofile)
        import pstats

        for order in ("tottime", "cumulative"):
            print(f"\n-- host time by {order} (cProfile, {wall_p:.1f} s wall) --")
            pstats.Stats(args.cprofile).sort_stats(order).print_stats(28)
    else:
        wall_p, kernels, _, _, _ = study_once(bundle, datasets, args.study_batch, args.device, profiled=True)
    busy = kernels / wall if kernels is not None else (nvml if nvml is not None else float("nan"))
    result["study"].update(profiled_wall_s=wall_p, kernel_s=kernels, busy=busy)
    save()
    print(f"study profiled wall {wall_p:.1f} s, kernel time {'n/a' if kernels is None else f'{kernels:.1f} s'}")
    print(f"study GPU busy fraction: {busy:.2f} ({'profiler kernel time' if kernels is not None else 'NVML'})",
          flush=True)

    if args.switch_interval:
        default_interval = sys.getswitchinterval()
        sys.setswitchinterval(args.switch_interval)
        try:
            w, _, _, u, t = study_once(bundle, datasets, args.study_batch, args.device, profiled=False)
        finally:
            sys.setswitchinterval(default_interval)
        result["study_switch_interval"] = {"interval_s": args.switch_interval, "wall_s": w, "nvml_busy": u, **t}
        save()
        print(f"study with a {args.switch_interval * 1e3:.2f} ms GIL switch interval: wall {w:.1f} s, NVML mean "
              f"utilization {'n/a' if u is None else f'{u:.2f}'}; host: {fmt_timings(t)}", flush=True)

    for extra in [int(b) for b in args.extra_study_batches.split(",") if b]:
        if args.deadline - (time.perf_counter() - started) < 1.5 * wall + 20:
            print(f"study at batch {extra} skipped: too little time left", flush=True)
            continue
        w, _, _, u, t = study_once(bundle, datasets, extra, args.device, profiled=False)
        result.setdefault("study_batches", []).append({"batch": extra, "wall_s": w, "nvml_busy": u, **t})
        save()
        print(f"study at batch {extra}: wall {w:.1f} s, NVML mean utilization {'n/a' if u is None else f'{u:.2f}'}; "
              f"host: {fmt_timings(t)}", flush=True)

    if args.compile and not args.skip_mfu:
        left = args.deadline - (time.perf_counter() - started)
        if left < args.compile_budget:
            print(f"\n--compile skipped: {left:.0f} s left of the deadline, {args.compile_budget:.0f} s needed")
            result["compile"] = f"skipped ({left:.0f} s left)"
        else:
            t0 = time.perf_counter()
            crows = mfu_rows(bundle, [int(b) for b in args.batch_sizes.split(",")], args.repeats, args.device,
                             peak, compiled_only=True)
            result["mfu"] = rows + crows
            result["compile"] = f"ran in {time.perf_counter() - t0:.0f} s (compilation included)"
            print_mfu_table(crows)
        save()
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
