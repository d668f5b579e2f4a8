"""Scorer benchmark: the fused scorer against the trunk floor and what users write by hand.

Variants, all on the same pre-encoded, left-padded batches (576 image tokens + text per query):
  a  trunk       model.model(...) alone: the floor any scorer must pay
  b  fused       RefusalScorer.forward: decision-position hooks + gathered unembedding rows,
                 margins and lens margins of all layers
  c  careful     model(..., output_hidden_states=True, logits_to_keep=1), then norm + full
                 lm_head on each layer's last position
  d  hurried     model(..., output_hidden_states=True) (full logits), then the same
  e  generate    generate(max_new_tokens=64) + refusal-phrase match

Time: median of --repeats runs after one warm-up, variants interleaved in one process; wall clock,
or with --clock cpu this thread's CPU time (with --threads 1 it is the work itself, robust to other
processes on a shared machine). b is timed as `score` runs it per batch: its hooks are registered
once around all batches (`holding_hooks`), outside the per-batch time. Memory:
peak bytes in use above the resting level during one run: CUDA allocator statistics on GPU;
glibc's in-use heap (mallinfo2, sampled every 0.2 ms) on CPU.

    python benchmarks/bench_scorer.py                       # tiny-random, CPU, batch 8 and 32
    python benchmarks/bench_scorer.py --device cuda --model 7b-random --dtype bfloat16
    python benchmarks/bench_scorer.py --short --variants ab   # ~30-token text-only prompts
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import threading
import ctypes
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from probing import Query, RefusalScorer, load_model  # noqa: E402
from probing.model import ModelBundle, build_random_model, find_llava_assets  # noqa: E402
from probing.render import encode  # noqa: E402

VARIANTS = {
    "a": "trunk only (floor)",
    "b": "fused scorer, all-layer lens",
    "c": "HF hidden_states + logits_to_keep=1",
    "d": "HF hidden_states + full logits",
    "e": "generate(64) + phrase match",
}
REFUSAL_PHRASES = ("I'm sorry", "I apologize", "As an AI", "I cannot", "I can't", "I am unable to")
WORDS = "please describe what the picture shows and explain every detail of the scene carefully".split()


def load_bench_model(name: str, device: str, dtype: str, n_layers: int | None) -> ModelBundle:
    if name == "7b-random":
        from transformers import AutoProcessor, LlavaConfig

        assets = find_llava_assets()
        cfg = LlavaConfig.from_pretrained(assets)
        if n_layers:
            cfg.text_config.num_hidden_layers = n_layers
        torch_dtype = getattr(torch, dtype)
        with torch.device(device):
            model = build_random_model(cfg, dtype=torch_dtype)
        proc = AutoProcessor.from_pretrained(assets)
        proc.tokenizer.padding_side = "left"
        return ModelBundle(model, proc, f"7b-random({cfg.text_config.num_hidden_layers} layers)")
    return load_model(name, device=device, dtype=dtype, n_layers=n_layers)


SHORT_WORDS = ("tell me in a few short words how people usually bake a simple loaf of bread at home on a "
               "quiet sunday morning").split()


def make_queries(n: int, short: bool = False) -> list[Query]:
    """Queries with a 336+ px image each, or (``short``) text-only prompts of about 30 tokens."""
    from PIL import Image

    if short:
        return [Query(f"q{i}", " ".join(SHORT_WORDS[: 18 + i % 3]).capitalize() + "?") for i in range(n)]
    queries = []
    for i in range(n):
        text = " ".join(WORDS[: 4 + (i * 5) % len(WORDS)])
        image = Image.new("RGB", (336 + 8 * i, 336), (30 * i % 256, 90, 160))
        queries.append(Query(f"q{i}", text.capitalize() + "?", image=image))
    return queries


SHORT = False  # set by --short


def make_inputs(bundle, batch: int):
    scorer = RefusalScorer(bundle, layers="all", batch_size=batch, progress=False)
    queries = make_queries(batch, SHORT)
    inputs = encode(bundle, scorer.render(queries), [q.image for q in queries])
    scorer.bench_left_padded = bool(inputs["attention_mask"][:, -1].all())  # `score` checks it so
    return scorer, inputs


def lens_from_hidden_states(bundle, scorer, hidden_states, logits):
    """What a user computes by hand: every layer's last position through norm + full lm_head."""
    n = bundle.n_layers
    last = [bundle.final_norm(hidden_states[i + 1][:, -1]) for i in range(n - 1)]
    last.append(hidden_states[-1][:, -1])  # transformers already normed the last one
    full = bundle.model.lm_head(torch.stack(last, 1))  # [batch, L, vocab]
    lens = scorer.resolved.margin(full[..., scorer.resolved.token_ids])
    return scorer.resolved.margin(logits[:, -1, scorer.resolved.token_ids]), lens


def run_variant(key: str, bundle, scorer, inputs):
    model = bundle.model
    with torch.inference_mode():
        if key == "a":
            return model.model(**inputs, use_cache=False).last_hidden_state[:, -1]
        if key == "b":  # as `score` runs it: the batch's left padding checked before (on the CPU)
            return scorer.forward(inputs, left_padded=scorer.bench_left_padded)[:2]
        if key in ("c", "d"):
            kw = {"logits_to_keep": 1} if key == "c" else {}
            out = model(**inputs, output_hidden_states=True, **kw)
            return lens_from_hidden_states(bundle, scorer, out.hidden_states, out.logits)
        if key == "e":
            gen_inputs = {k: v for k, v in inputs.items() if k != "position_ids"}
            out = model.generate(**gen_inputs, max_new_tokens=64, min_new_tokens=64, do_sample=False,
                                 pad_token_id=bundle.tokenizer.pad_token_id)
            texts = bundle.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            return [any(p in t for p in REFUSAL_PHRASES) for t in texts]
    raise ValueError(key)


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def _heap_in_use():
    """Bytes glibc has handed out and not got back (heap + mmap), or None off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None

    def used() -> int:
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd

    return used


class HeapPeak:
    """Peak growth of in-use CPU heap while the block runs, sampled every 0.2 ms.

    In-use bytes (glibc mallinfo2), not RSS: memory an allocator keeps after a free does not
    count, so variants measured one after another in the same process do not hide each other.
    """

    def __init__(self, interval=0.0002):
        self.used = _heap_in_use()
        if self.used is None:
            import psutil

            proc = psutil.Process()
            self.used = lambda: proc.memory_info().rss  # fallback: resident set size
        self.interval = interval

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.used())
            time.sleep(self.interval)

    def __enter__(self):
        self.start = self.peak = self.used()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.used())

    @property
    def growth(self) -> int:
        return self.peak - self.start


def measure_memory(bundle, key: str, batch: int) -> tuple[float, int]:
    """Peak extra memory (MiB) of one variant's run, and the padded sequence length."""
    scorer, inputs = make_inputs(bundle, batch)
    if str(bundle.device).startswith("cuda"):
        torch.cuda.empty_cache()
        _sync(bundle.device)
        rest = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_variant(key, bundle, scorer, inputs)
        _sync(bundle.device)
        peak = torch.cuda.max_memory_allocated() - rest
    else:
        run_variant(key, bundle, scorer, inputs)  # warm: lazy buffers are not the variant's cost
        with HeapPeak() as heap:
            run_variant(key, bundle, scorer, inputs)
        peak = heap.growth
    return peak / 2**20, int(inputs["input_ids"].shape[1])


CLOCK = time.perf_counter  # --clock cpu: time.thread_time


def time_variants(bundle, keys: str, batch: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per batch for each variant, runs interleaved (order alternating between rounds)
    so machine noise and allocator after-effects hit all variants alike."""
    scorer, inputs = make_inputs(bundle, batch)
    times: dict[str, list[float]] = {k: [] for k in keys}
    for key in keys:  # warm-up
        run_variant(key, bundle, scorer, inputs)
    for rep in range(repeats):
        # alternate the order: a variant that follows a huge allocation (d) runs slower
        for key in (keys if rep % 2 == 0 else keys[::-1]):
            # b as in score(): its hooks are registered once per score() call, around all batches,
            # so their registration is outside the per-batch time (the floor a runs without them)
            with (getattr(scorer, "holding_hooks", contextlib.nullcontext)() if key == "b" else contextlib.nullcontext()):
                _sync(bundle.device)
                t0 = CLOCK()
                run_variant(key, bundle, scorer, inputs)
                _sync(bundle.device)
                times[key].append(CLOCK() - t0)
    return times


def check_agreement(bundle, batch: int) -> float:
    """Max |margin difference| between the fused scorer and the careful HF variant."""
    scorer, inputs = make_inputs(bundle, batch)
    m_b, lens_b = run_variant("b", bundle, scorer, inputs)
    m_c, lens_c = run_variant("c", bundle, scorer, inputs)
    return float(max((m_b - m_c).abs().max(), (lens_b - lens_c).abs().max()))


def table(results: list[dict], machine: str) -> str:
    lines = [f"machine: {machine}", "",
             "| batch | seq | variant | time / batch (s) | queries/s | peak extra memory (MiB) | time vs a | memory vs b |",
             "|---|---|---|---|---|---|---|---|"]
    for batch in sorted({r["batch"] for r in results}):
        rows = {r["variant"]: r for r in results if r["batch"] == batch}
        for key, r in rows.items():
            t_a = rows["a"]["time_s"] if "a" in rows else float("nan")
            m_b = rows["b"]["peak_mb"] if "b" in rows else float("nan")
            lines.append(f"| {batch} | {r['seq']} | {key}: {VARIANTS[key]} | {r['time_s']:.5f} | "
                         f"{batch / r['time_s']:.1f} | {r['peak_mb']:.1f} | {r['time_s'] / t_a:.2f}x | "
                         f"{r['peak_mb'] / max(m_b, 1e-9):.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-random", help="'tiny-random' or '7b-random'")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--n-layers", type=int, default=None)
    p.add_argument("--batch-sizes", default="8,32")
    p.add_argument("--variants", default="abcde")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--short", action="store_true", help="~30-token text-only prompts instead of 576 image tokens")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall clock, or this thread's CPU time (use with --threads 1)")
    args = p.parse_args(argv)
    global SHORT, CLOCK
    SHORT = args.short
    CLOCK = time.thread_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)

    batches = [int(b) for b in args.batch_sizes.split(",")]
    cpu = not args.device.startswith("cuda")
    torch.manual_seed(0)
    bundle = load_bench_model(args.model, args.device, args.dtype, args.n_layers)
    print(f"agreement fused vs HF (max |margin diff|, batch {batches[0]}): "
          f"{check_agreement(bundle, batches[0]):.2e}", flush=True)
    results = []
    for batch in batches:
        times = time_variants(bundle, args.variants, batch, args.repeats)
        for key in args.variants:
            peak_mb, seq = measure_memory(bundle, key, batch)
            res = {"variant": key, "batch": batch, "seq": seq, "time_s": statistics.median(times[key]),
                   "peak_mb": peak_mb, "times": times[key]}
            results.append(res)
            print(f"batch {batch:>3} {key}: {res['time_s']:.4f}s  {peak_mb:.1f} MiB", flush=True)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
               if cpu else torch.cuda.get_device_name())
    print()
    print(f"model: {args.model}, dtype {args.dtype}, device {args.device}, {torch.get_num_threads()} torch "
          f"threads, {args.clock} clock{', short text-only prompts' if args.short else ''}")
    print(table(results, machine))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "machine": machine, "results": results}, indent=1))


if __name__ == "__main__":
    main()
