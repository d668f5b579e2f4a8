"""GPU checks of issue 15, prepared for a lent accelerator: the scorer's MFU by attention path,
and the whole study's GPU busy fraction. LLaVA-1.5-7B architecture, random bf16 weights, the real
processor (576 image tokens a query).

Part 1, MFU by attention path: the fused scorer as `score` runs it (hooks held, left-padded read)
at each batch size under every attention implementation available here (``sdpa``, ``eager``, and
``flash_attention_2`` when flash-attn is installed); with ``--compile`` also ``sdpa`` with the
language model compiled in place (``torch.compile``). MFU as in bench_gpu.py (prefill FLOPs over
real tokens / time / the card's peak bf16 FLOP/s).

Part 2, the study's busy fraction: `experiments.study.Study` over toy test queries with the
baseline, two SR defenses (one with a system prompt), `qr_caption`, `ni_image_gaussian`,
`ni_text_smooth` and two ensembles (`mo_finetune` left out: its training at 7B alone outlasts a
device session). Run twice in fresh run directories: once for the wall time, once under
torch.profiler for the kernel time (the union of all kernel intervals, so overlapping streams
count once). Busy fraction = kernel time / unprofiled wall time (goal >= 0.90).

    python benchmarks/gpu_study.py                                       # on a GPU
    python benchmarks/gpu_study.py --model tiny-random --device cpu --dtype float32 \\
        --batch-sizes 2 --queries 4 --repeats 1                          # the CPU smoke run
"""

from __future__ import annotations

import argparse
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


def mfu_rows(bundle, batches: list[int], repeats: int, device: str, peak: float, compile_: bool) -> list[dict]:
    rows = []
    runs = [(attn, False) for attn in attention_paths()] + ([("sdpa", True)] if compile_ else [])
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
    """Union of the device kernel intervals of a profile, in seconds."""
    from torch.autograd import DeviceType

    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == DeviceType.CUDA)
    total, end = 0, None
    for a, b in spans:
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total / 1e6


def study_once(bundle, n_queries: int, batch: int, device: str, profiled: bool) -> tuple[float, float | None, int]:
    import experiments.study as study_mod
    from experiments.study_config import StudyConfig

    real_load = study_mod.load_model
    study_mod.load_model = lambda *a, **k: bundle  # the study scores the model built here
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = StudyConfig(model="tiny-random", out=str(Path(tmp) / "study"), defenses=list(STUDY_DEFENSES),
                              ensembles=list(STUDY_ENSEMBLES), datasets=[{"name": "toy", "tag": "toy", "limit": n_queries}],
                              batch_size=batch, generation_check=0)
            study = study_mod.Study(cfg)
            try:
                activities = [torch.profiler.ProfilerActivity.CPU]
                if device.startswith("cuda"):
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                prof = torch.profiler.profile(activities=activities) if profiled else None
                if prof is not None:
                    prof.__enter__()
                _sync(device)
                t0 = time.perf_counter()
                study.score_shared_prefixes()
                for name in study.conditions:
                    study.table(name)
                _sync(device)
                wall = time.perf_counter() - t0
                if prof is not None:
                    prof.__exit__(None, None, None)
                kernels = kernel_seconds(prof) if prof is not None and device.startswith("cuda") else None
                return wall, kernels, len(study.queries)
            finally:
                study.run.close()
    finally:
        study_mod.load_model = real_load


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="7b-random")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--n-layers", type=int, default=None)
    p.add_argument("--batch-sizes", default="8,16,32,64")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also time sdpa with the language model compiled")
    p.add_argument("--queries", type=int, default=48, help="toy test queries in the study")
    p.add_argument("--study-batch", type=int, default=16)
    p.add_argument("--skip-mfu", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    bundle = load_bench_model(args.model, args.device, args.dtype, args.n_layers)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    peak = peak_flops(args.device, args.peak_tflops)
    print(f"model {bundle.name}, {args.dtype}, {device_name}, torch {torch.__version__}", flush=True)

    rows = [] if args.skip_mfu else mfu_rows(bundle, [int(b) for b in args.batch_sizes.split(",")],
                                            args.repeats, args.device, peak, args.compile)
    wall, _, n = study_once(bundle, args.queries, args.study_batch, args.device, profiled=False)
    wall_p, kernels, _ = study_once(bundle, args.queries, args.study_batch, args.device, profiled=True)
    busy = kernels / wall if kernels is not None else float("nan")

    print("\n| attention | compiled | batch | s / batch | queries/s | TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['attn']} | {r['compile']} | {r.get('batch', '-')} | {r['error']} | | | |")
        else:
            print(f"| {r['attn']} | {r['compile']} | {r['batch']} | {r['s']:.4f} | {r['queries_s']:.1f} | "
                  f"{r['tflops']:.1f} | {r['mfu']:.1%} |")
    print(f"\nstudy: {n} queries, {len(STUDY_DEFENSES)} defenses, {len(STUDY_ENSEMBLES)} ensembles, batch "
          f"{args.study_batch}: wall {wall:.1f} s ({n / wall:.2f} queries/s per condition set), "
          f"profiled wall {wall_p:.1f} s, kernel time {'n/a' if kernels is None else f'{kernels:.1f} s'}")
    print(f"study GPU busy fraction: {busy:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"mfu": rows, "study": {"queries": n, "wall_s": wall,
                                                                       "profiled_wall_s": wall_p,
                                                                       "kernel_s": kernels, "busy": busy}},
                                              indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
