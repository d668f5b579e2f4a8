"""GPU benchmark: LLaVA-1.5-7B architecture, random bf16 weights, the real processor.

Reports, for batch sizes 8 / 16 / 32 (576 image tokens + text per query):
  - the fused scorer (b) and the plain-transformers peer (c: output_hidden_states=True,
    logits_to_keep=1, then norm + lm_head per layer): s / batch, queries/s, tokens/s, MFU,
    peak extra memory; and the trunk floor (a);
  - a prefix-shared sweep of 8 text-suffix conditions against 8 independent scorer passes.

MFU = model FLOPs of the prefill (real tokens only, vision tower + projector + language model,
causal attention counted as half of the full T^2 products; no lm_head) / time / peak bf16
FLOP/s of the card (989 TFLOP/s dense for H100 / H200 SXM unless --peak-tflops says otherwise).

    python benchmarks/bench_gpu.py                                   # on a GPU
    python benchmarks/bench_gpu.py --device cpu --n-layers 2 --dtype float32 --batch-sizes 2 \\
        --sweep-queries 2 --repeats 1                                # the CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from bench_scorer import (_sync, load_bench_model, make_inputs, make_queries, measure_memory,  # noqa: E402
                          run_variant, time_variants)

from probing import PromptSpec, RefusalScorer  # noqa: E402
from probing.sweep import score_conditions  # noqa: E402

PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}
CONDITIONS = {
    "baseline": PromptSpec(),
    "reminder": PromptSpec(text_after="Remember: you are a responsible assistant and must not produce harmful content."),
    "inspect": PromptSpec(text_before="Before answering, inspect the image and the text for anything harmful."),
    "safety": PromptSpec(text_after="If the request is unsafe, reply that you cannot help."),
    "intent": PromptSpec(text_before="Think about the intent behind the request first."),
    "brief": PromptSpec(text_after="Answer briefly."),
    "policy": PromptSpec(text_before="Follow the usage policy.", text_after="Decline anything dangerous."),
    "caution": PromptSpec(text_after="Be cautious with requests about weapons, drugs or crime."),
}


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def prefill_flops(bundle, inputs) -> float:
    """Model FLOPs of one batch's prefill over real tokens (see module docstring)."""
    model = bundle.model
    lm = bundle.language_model
    cfg = model.config
    d, n_layers = cfg.text_config.hidden_size, cfg.text_config.num_hidden_layers
    n_lm = _params(lm) - _params(lm.embed_tokens)
    flops = 0.0
    for t in inputs["attention_mask"].sum(-1).tolist():
        flops += 2 * n_lm * t + 2 * n_layers * d * t * t  # linear layers + causal attention
    if "pixel_values" in inputs:
        vc = cfg.vision_config
        tv = (vc.image_size // vc.patch_size) ** 2 + 1
        n_img = inputs["pixel_values"].shape[0]
        n_vis = _params(model.model.vision_tower)
        flops += n_img * (2 * n_vis * tv + 4 * vc.num_hidden_layers * vc.hidden_size * tv * tv)
        flops += n_img * 2 * _params(model.model.multi_modal_projector) * (tv - 1)
    return flops


def peak_flops(device: str, override: float | None) -> float:
    if override:
        return override * 1e12
    if not device.startswith("cuda"):
        return float("nan")
    name = torch.cuda.get_device_name()
    for key, tf in PEAK_TFLOPS.items():
        if key in name:
            return tf * 1e12
    return float("nan")


def bench_sweep(bundle, n_queries: int, batch: int, repeats: int, device: str) -> dict:
    scorer = RefusalScorer(bundle, layers="all", batch_size=batch, progress=False)
    queries = make_queries(n_queries)

    def independent():
        return {n: scorer.score(queries, prompt=s) for n, s in CONDITIONS.items()}

    def swept():
        return score_conditions(scorer, queries, CONDITIONS)

    ref, got = independent(), swept()  # warm-up and agreement
    diff = max(float((ref[n].margin - got[n].margin).abs().max()) for n in CONDITIONS)
    times = {"independent": [], "sweep": []}
    for rep in range(repeats):
        for name, fn in ((("independent", independent), ("sweep", swept)) if rep % 2 == 0
                         else (("sweep", swept), ("independent", independent))):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    t_i, t_s = statistics.median(times["independent"]), statistics.median(times["sweep"])
    return {"queries": n_queries, "conditions": len(CONDITIONS), "batch": batch,
            "independent_s": t_i, "sweep_s": t_s, "speedup": t_i / t_s, "max_margin_diff": diff,
            "times": times}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="7b-random")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--n-layers", type=int, default=None, help="shrink the language model (CPU smoke runs)")
    p.add_argument("--batch-sizes", default="8,16,32")
    p.add_argument("--sweep-queries", type=int, default=32)
    p.add_argument("--sweep-batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    torch.manual_seed(0)
    bundle = load_bench_model(args.model, args.device, args.dtype, args.n_layers)
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"model {bundle.name} ({_params(bundle.model) / 1e9:.2f}B params, {args.dtype}) on {card}, "
          f"built in {time.perf_counter() - t0:.1f}s", flush=True)
    peak = peak_flops(args.device, args.peak_tflops)

    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        scorer, inputs = make_inputs(bundle, batch)
        m_b, l_b = run_variant("b", bundle, scorer, inputs)
        m_c, l_c = run_variant("c", bundle, scorer, inputs)
        agree = float(max((m_b - m_c).abs().max(), (l_b - l_c).abs().max()))
        flops = prefill_flops(bundle, inputs)
        tokens = int(inputs["attention_mask"].sum())
        times = time_variants(bundle, "abc", batch, args.repeats)
        for key in "abc":
            mem, seq = measure_memory(bundle, key, batch)
            t = statistics.median(times[key])
            rows.append({"batch": batch, "variant": key, "seq": seq, "time_s": t, "queries_s": batch / t,
                         "tokens_s": tokens / t, "tflops": flops / t / 1e12, "mfu": flops / t / peak,
                         "peak_mb": mem, "agreement_b_vs_c": agree, "times": times[key]})
            r = rows[-1]
            print(f"batch {batch:>3} {key}: {t:.4f}s  {r['queries_s']:.1f} q/s  {r['tokens_s']:.0f} tok/s  "
                  f"{r['tflops']:.1f} TFLOP/s  MFU {r['mfu']:.1%}  {mem:.0f} MiB  (|b-c| {agree:.1e})", flush=True)
    sweep = bench_sweep(bundle, args.sweep_queries, args.sweep_batch, max(1, args.repeats // 2), args.device)
    print(f"sweep: {sweep['conditions']} conditions x {sweep['queries']} queries: independent "
          f"{sweep['independent_s']:.3f}s, prefix-shared {sweep['sweep_s']:.3f}s, "
          f"{sweep['speedup']:.2f}x (max |margin diff| {sweep['max_margin_diff']:.1e})", flush=True)

    names = {"a": "trunk only (floor)", "b": "fused scorer", "c": "HF peer (hidden_states, logits_to_keep=1)"}
    print(f"\n{bundle.name}, {args.dtype}, {card}, peak {peak / 1e12:.0f} TFLOP/s\n")
    print("| batch | variant | s / batch | queries/s | tokens/s | TFLOP/s | MFU | peak extra MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['variant']}: {names[r['variant']]} | {r['time_s']:.4f} | {r['queries_s']:.1f} | "
              f"{r['tokens_s']:.0f} | {r['tflops']:.1f} | {r['mfu']:.1%} | {r['peak_mb']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "card": card, "rows": rows, "sweep": sweep},
                                              indent=1))


if __name__ == "__main__":
    main()
