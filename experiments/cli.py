"""The ``mechprobe`` command line.

    mechprobe demo                       # the toy's test split: baseline vs every defense
    mechprobe score --queries q.jsonl    # score your own JSONL queries
    accelerate launch --multi_gpu --num_processes 4 -m probing.cli score ...   # one process per GPU
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .model import load_model
from .query import Query
from .render import PromptSpec
from .score_table import ScoreTable
from .scorer import RefusalScorer

# Every defense that needs nothing but the model (activation-level ones get the baseline run).
DEMO_DEFENSES = ["sr_self_reminder", "sr_adashield_s", "sr_mmsafety", "qr_caption", "qr_caption_no_image",
                 "qr_intention", "qr_rewrite", "ni_image_gaussian", "ni_image_mask", "ni_text_smooth",
                 "mo_finetune", "act_steer", "act_ablate"]


def _tiny_random_queries() -> list[Query]:
    """A small harmful / benign set for models without a synthetic test split of their own."""
    from .datasets import toy

    return toy.requests("test", kinds=("text",), alarming=False)


def _summary_row(name: str, table: ScoreTable) -> dict:
    p = table.p_refuse.numpy()
    labels = np.array([lab or "" for lab in table.labels])
    h, b = p[labels == "harmful"], p[labels == "benign"]
    return {
        "condition": name,
        "n": len(table),
        "refusal_harmful": float((h > 0.5).mean()) if len(h) else float("nan"),
        "refusal_benign": float((b > 0.5).mean()) if len(b) else float("nan"),
        "mean_p_refuse_harmful": float(h.mean()) if len(h) else float("nan"),
        "mean_p_refuse_benign": float(b.mean()) if len(b) else float("nan"),
    }


def _write_summary(out: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    rows = [{k: r.get(k, "") for k in keys} for r in rows]
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    with (out / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    widths = [max(len(k), 8) for k in keys]
    print("  ".join(f"{k:>{w}}" for k, w in zip(keys, widths)))
    for r in rows:
        print("  ".join(f"{r[k]:>{w}.3f}" if isinstance(r[k], float) else f"{r[k]!s:>{w}}"
                        for k, w in zip(keys, widths)))


def cmd_demo(args) -> int:
    from defenses import act_ablate, act_steer, get_defense

    from .analysis import compare
    from .datasets import toy
    from .layerwise import layer_profile
    from .plots import plot_distributions, plot_layer_profiles

    bundle = load_model(args.model, device=args.device)
    queries = toy.requests("test") if args.model == "toy" else _tiny_random_queries()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scorer = RefusalScorer(bundle, args.readout, batch_size=args.batch_size, keep_hidden=True, progress=False)
    names = args.defenses.split(",") if args.defenses else DEMO_DEFENSES
    baseline = scorer.score(queries, meta={"condition": "baseline"})
    tables = {"baseline": baseline}
    rows, profiles = [_summary_row("baseline", baseline)], []
    for name in tqdm(names, desc="defenses", unit="defense"):
        if name == "act_steer":
            defense = act_steer(baseline, alpha=1.0)
        elif name == "act_ablate":
            defense = act_ablate(baseline, layers=list(range(1, max(2, bundle.n_layers - 1))))
        else:
            defense = get_defense(name)
        table = scorer.score(queries, defense=defense)
        tables[name] = table
        eff = compare(baseline, table, name=name, n_boot=args.n_boot)
        row = _summary_row(name, table)
        row.update({"mean_shift": eff["mean_shift"].value, "distance_change": eff["distance_change"].value,
                    "auroc": eff["auroc_def"].value, "auroc_change": eff["auroc_change"].value,
                    "dprime_change": eff["dprime_change"].value, "label": eff.label})
        rows.append(row)
        profiles.append(layer_profile(baseline, table, "lens", name=name, n_boot=max(20, args.n_boot // 5)))
    for name, table in tables.items():
        table.hidden = None  # the shards keep scores; hidden states stay in memory
        table.save(out / "scores" / name)
    _write_summary(out, rows)
    shown = ["baseline"] + [n for n in ("sr_self_reminder", "qr_caption", "mo_finetune", "act_ablate") if n in tables]
    plot_distributions({n: tables[n] for n in shown}, out / "distributions.png")
    plot_layer_profiles([p for p in profiles if p.name in shown], out / "layers.png")
    if args.model == "tiny-random":
        print("\nnote: tiny-random has random weights; these numbers exercise the pipeline only.")
    print(f"wrote {out}/ (summary.csv, summary.json, distributions.png, layers.png, scores/)")
    return 0


def cmd_score(args) -> int:
    from .datasets import load_jsonl
    from .distributed import is_distributed_launch, process_state, score_sharded

    state = process_state(cpu=args.device == "cpu") if is_distributed_launch() else None
    device = str(state.device) if state is not None else args.device
    device_map = args.device_map
    if device_map and device_map.startswith("{"):
        device_map = json.loads(device_map)
    bundle = load_model(args.model, device=device, dtype=args.dtype, device_map=device_map)
    queries = load_jsonl(args.queries)
    layers = "all" if args.layers == "all" else (None if args.layers == "none"
                                                  else [int(x) for x in args.layers.split(",")])
    spec = PromptSpec(system_prompt=args.system_prompt)
    main_process = state is None or state.is_main_process
    scorer = RefusalScorer(bundle, args.readout, layers=layers, keep_hidden=args.keep_hidden,
                           batch_size=args.batch_size, prompt=spec, progress=True if main_process else False)
    table = score_sharded(lambda qs: scorer.score(qs, meta={"condition": args.condition}),
                          queries, args.out, state)
    if table is not None:
        _write_summary(Path(args.out), [_summary_row(args.condition, table)])
        print(f"wrote {args.out}/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mechprobe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, model_default="tiny-random"):
        p.add_argument("--model", default=model_default,
                       help="'tiny-random' or a llava-hf LLaVA-1.5 checkpoint dir / hub id")
        p.add_argument("--device", default="cpu")
        p.add_argument("--readout", default="first_token", choices=["first_token", "yes_no"])
        p.add_argument("--batch-size", type=int, default=8)

    demo = sub.add_parser("demo", help="score the toy's test split under the baseline and every defense, "
                                       "analyse and plot")
    common(demo, model_default="toy")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--n-boot", type=int, default=500, help="bootstrap resamples for the intervals")
    demo.add_argument("--defenses", default=None, help="comma-separated defense names (default: all that need "
                                                          "nothing but the model)")
    demo.set_defaults(func=cmd_demo)

    score = sub.add_parser("score", help="score JSONL queries (id, text, image, label, meta)")
    common(score)
    score.add_argument("--queries", required=True, help="JSONL file")
    score.add_argument("--out", required=True, help="output directory for the ScoreTable")
    score.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16")
    score.add_argument("--layers", default="all", help="'all', 'none' or comma-separated indices")
    score.add_argument("--keep-hidden", action="store_true", help="store decision-position residuals")
    score.add_argument("--system-prompt", default=None)
    score.add_argument("--condition", default="baseline", help="name recorded in the table")
    score.add_argument("--device-map", default=None,
                       help="'auto', 'balanced' or a JSON dict of module -> device (models larger than one device)")
    score.set_defaults(func=cmd_score)

    import importlib

    from experiments import EXPERIMENTS

    for name in EXPERIMENTS:
        module = importlib.import_module(f"experiments.{name}")
        sub_p = sub.add_parser(name, help=module.__doc__.strip().splitlines()[0], description=module.__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub_p)
        sub_p.set_defaults(func=lambda args, m=module: _run_experiment(m, args))
    return parser


def _run_experiment(module, args) -> int:
    module.run(args)
    out = Path(args.out)
    print((out / "report.md").read_text())
    print(f"wrote {out}/ (config.json, shards/, tables/, report.md, plots)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"mechprobe: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
