"""The ``mechprobe`` command line (the only place that prints).

    mechprobe demo                       # the toy's test split: baseline vs every defense
    mechprobe score --queries q.jsonl    # score your own JSONL queries
    mechprobe mechanisms | ensembles | layerwise | modality | generation_check
    accelerate launch --multi_gpu --num_processes 4 -m experiments.cli score ...   # one process per GPU

Heavy libraries (torch, transformers) are imported only when a command runs, so ``--help``
answers at once. A `MechprobeError` (bad input, data, run directory) or an `OSError` (a file the
system refused) ends in one line on stderr and exit code 2; Ctrl-C in one line and exit code 130;
SIGTERM while a run directory is locked (a scheduler's time limit) in one line and exit code 143,
the lock released (`experiments.interrupts`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from . import EXPERIMENTS, options

# Experiment modules are imported lazily; their one-line help is kept here so --help stays light.
HELP = {
    "study": "the paper's whole analysis over a combined benchmark: --config study.toml or flags",
    "demo": "the study on the embedded toy: baseline, defenses and ensembles on its test split",
    "mechanisms": "baseline plus a list of defenses on a dataset -> how each defense works",
    "ensembles": "pairs of defenses, '+' and '|', predicted and measured; Pareto plot",
    "layerwise": "the per-layer shift / separation decomposition of chosen defenses",
    "modality": "the multimodal safety gap per layer (text vs typography vs picture)",
    "generation_check": "does the one-forward readout predict generated refusals?",
}


def check_score_defense(expression: str) -> None:
    """``--defense`` of `mechprobe score`: known names (with "did you mean") and no activation
    defense, which is built from a baseline run's hidden states that `score` does not make."""
    from defenses import check_names, registry
    from probing.errors import InputError

    try:
        check_names(expression)
    except InputError as exc:
        raise InputError(f"--defense: {exc}") from None
    needs = [p for p in registry.split_expression(expression) if registry.needs_baseline(registry.REGISTRY[p])]
    if needs:
        raise InputError(f"--defense {expression!r}: {needs[0]} is built from a baseline run's hidden states, which "
                         "`mechprobe score` does not make; use `mechprobe mechanisms` or `mechprobe study` "
                         "(they score the baseline first)")


def parse_device_map(text: str | None):
    """``--device-map``: 'auto', 'balanced' (and accelerate's other names) or a JSON object of
    module -> device."""
    import json

    from probing.errors import InputError

    if not text or not text.lstrip().startswith("{"):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"--device-map {text!r}: not valid JSON ({exc}); give 'auto', 'balanced' or a JSON "
                         "object of module -> device, e.g. '{\"\": 0}'") from None
    if not isinstance(value, dict):
        raise InputError(f"--device-map {text!r}: expected a JSON object of module -> device")
    return value


def check_out_dir(out: str) -> None:
    """``--out`` can become the output directory: it is not a file, nor under one, and its nearest
    existing folder is writable."""
    import os

    from probing.errors import RunDirError

    path = Path(out)
    for here in (path, *path.parents):
        if here.exists():
            if not here.is_dir():
                raise RunDirError(f"--out {out}: {here} is a file, not a directory; choose another --out")
            if not os.access(here, os.W_OK | os.X_OK):
                raise RunDirError(f"--out {out}: {here} is not writable; choose another --out")
            return


def cmd_score(args) -> int:
    import json

    from probing.datasets import load_jsonl
    from probing.distributed import is_distributed_launch, process_state, score_sharded
    from probing.errors import RunDirError
    from probing.model import load_model
    from probing.query import check_images
    from probing.render import PromptSpec
    from probing.scorer import RefusalScorer

    from .common import check_device, warn_out_of_vocabulary
    from .demo import summary_row
    from .report import text_table, write_table

    # Every input is checked before the model loads, cheapest first (options, then files).
    if args.defense:
        check_score_defense(args.defense)
    check_device(args.device)
    device_map = parse_device_map(args.device_map)
    check_out_dir(args.out)
    condition = args.condition or args.defense or "baseline"
    settings = {k: v for k, v in vars(args).items() if k not in ("func", "verbose", "overwrite", "out", "command")}
    stamp = Path(args.out) / "score_config.json"
    if stamp.is_file() and not args.overwrite:
        old = json.loads(stamp.read_text())
        changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if changed:
            raise RunDirError(f"{args.out} holds scores made with other settings (differs in {changed}); "
                              "use another --out, or --overwrite to replace them")
    queries = load_jsonl(args.queries)
    check_images(queries)
    warn_out_of_vocabulary(queries, args.model)
    layers = "all" if args.layers == "all" else (None if args.layers == "none"
                                                  else [int(x) for x in args.layers.split(",")])

    state = process_state(cpu=args.device == "cpu") if is_distributed_launch() else None
    device = str(state.device) if state is not None else args.device
    bundle = load_model(args.model, device=device, dtype=args.dtype, device_map=device_map,
                        image_aspect_ratio=args.image_aspect_ratio)
    spec = PromptSpec(system_prompt=args.system_prompt)
    main_process = state is None or state.is_main_process
    scorer = RefusalScorer(bundle, args.readout, layers=layers, keep_hidden=args.keep_hidden,
                           batch_size=args.batch_size, prompt=spec, progress=True if main_process else False)
    table = score_sharded(lambda qs: scorer.score(qs, defense=args.defense or None, meta={"condition": condition}),
                          queries, args.out, state)
    if table is not None:
        stamp.write_text(json.dumps(settings, indent=1, default=str))
        rows = [summary_row(condition, table)]
        write_table(Path(args.out) / "summary", rows)
        print(text_table(rows, list(rows[0])))
        if args.model == "tiny-random":
            print("note: tiny-random has random weights; these numbers exercise the pipeline only.")
        print(f"wrote {args.out}/")
    return 0


def _run_experiment(name: str, args) -> int:
    from .runs import close_all

    module = importlib.import_module(f"experiments.{name}")
    if getattr(module, "INTRO", None) and getattr(args, "model", None) == "toy":
        print("\n".join(module.INTRO))  # the demo says what the toy is before it runs
    try:
        module.run(args)
    finally:  # interrupted or failed: the run directory's lock is released all the same
        close_all()
    out = Path(args.out)
    print((out / "report.md").read_text())
    if args.model == "tiny-random":
        print("note: tiny-random has random weights; these numbers exercise the pipeline only.")
    written = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir() if not p.name.startswith("."))
    print(f"wrote {out}/ ({', '.join(written)})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mechprobe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    verbose = argparse.ArgumentParser(add_help=False)  # -v works before and after the subcommand
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="log at INFO level")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    score = sub.add_parser("score", parents=[verbose], help="score JSONL queries (id, text, image, label, meta)")
    score.add_argument("--model", default="toy",
                       help="'toy' (default), 'tiny-random' (random weights: pipeline checks only), or a "
                            "llava-hf LLaVA-1.5 checkpoint dir / hub id")
    score.add_argument("--device", default="cpu")
    score.add_argument("--readout", default="first_token", choices=["first_token", "yes_no"])
    score.add_argument("--batch-size", type=options.positive_int, default=8)
    score.add_argument("--queries", required=True, help="JSONL file")
    score.add_argument("--out", required=True, help="output directory for the ScoreTable")
    score.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16")
    score.add_argument("--image-aspect-ratio", default="pad", choices=list(options.IMAGE_ASPECT_RATIOS),
                       help=options.ASPECT_HELP)
    score.add_argument("--layers", default="all", type=options.layer_spec,
                       help="'all', 'none' or comma-separated indices")
    score.add_argument("--keep-hidden", action="store_true", help="store decision-position residuals")
    score.add_argument("--system-prompt", default=None)
    score.add_argument("--defense", default=None,
                       help=f"score under a defense or ensemble expression: {options.DEFENSE_NAMES} "
                            "(not act_*: built from a baseline run, use `mechprobe mechanisms` or `study`)")
    score.add_argument("--condition", default=None, help="name recorded in the table (default: the defense, "
                                                         "or 'baseline')")
    score.add_argument("--overwrite", action="store_true", help="replace scores made with other settings")
    score.add_argument("--device-map", default=None,
                       help="'auto', 'balanced' or a JSON dict of module -> device (models larger than one device)")
    score.set_defaults(func=cmd_score)

    for name in EXPERIMENTS:
        sub_p = sub.add_parser(name, parents=[verbose], help=HELP[name],
                               description=f"{HELP[name]} (module experiments/{name}.py)")
        getattr(options, name)(sub_p)
        sub_p.set_defaults(func=lambda args, n=name: _run_experiment(n, args))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from hooks.errors import MechprobeError

    from .interrupts import Terminated, check, remembered

    try:
        with remembered():  # a Ctrl-C swallowed by a finalizer is raised again (`interrupts`)
            code = args.func(args)
            check()
            return code
    except Terminated:  # SIGTERM while a run directory held its lock (released on the way out)
        print("terminated (SIGTERM): rerun the same command to resume", file=sys.stderr)
        return 128 + 15  # what a shell reports for a process SIGTERM ended
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    except (MechprobeError, ValueError) as exc:
        print(f"mechprobe: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file or folder the system refused (exists, permission, disk full)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"mechprobe: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
