"""demo: the study (experiments/study.py) on the embedded toy, not a code path of its own.

    mechprobe demo                      # about 40 s on 2 CPU cores (docs/performance.md)
    mechprobe demo --defenses sr_self_reminder,qr_caption_no_image

Runs `mechprobe study` with model "toy", the toy's test split, the demo's defenses and the
ensembles among ``DEMO_ENSEMBLES`` whose members are in ``--defenses`` (or ``--ensembles``).
Writes what every study writes: summary.csv|json, scores/<condition>/, tables/, the figures,
report.md and report.html.
"""

from __future__ import annotations

from probing.analysis import refusal_rate

from . import options, study_config
from .study import run_config

#: What the CLI prints before the demo runs (and the report opens with).
INTRO = (
    "The toy is a 1.4 M-parameter LLaVA-style model (LLaVA-1.5's chat-template style, 112 px images) shipped in "
    "probing/toy/weights/, trained by `python -m probing.toy.train` on a synthetic multimodal safety set.",
    "It refuses harmful text, falls for the typography attack, over-refuses some alarming-but-benign requests "
    "and listens to safety prompts: its numbers show how the study reads, they are not LLaVA-1.5's.",
)
DEMO_ENSEMBLES = ("sr_self_reminder+mo_finetune", "qr_caption_no_image|sr_self_reminder")

add_arguments = options.demo  # the options live in experiments/options.py


def summary_row(name: str, table) -> dict:
    """Refusal rates and mean P(refuse) of one table (`mechprobe score` prints it)."""
    p = table.p_refuse.numpy()
    is_h = [lab == "harmful" for lab in table.labels]
    is_b = [lab == "benign" for lab in table.labels]
    h, b = p[is_h], p[is_b]
    return {"condition": name, "n": len(table),
            "refusal_harmful": float(refusal_rate(h)), "refusal_benign": float(refusal_rate(b)),
            "mean_p_refuse_harmful": float(h.mean()) if len(h) else None,
            "mean_p_refuse_benign": float(b.mean()) if len(b) else None}


def config_of(args) -> study_config.StudyConfig:
    """The study the demo runs."""
    from defenses.registry import split_expression

    from .common import split_dataset_spec

    defenses = [n for n in args.defenses.split(",") if n]
    if args.ensembles is not None:
        ensembles = [e for e in args.ensembles.split(",") if e]
    else:
        ensembles = [e for e in DEMO_ENSEMBLES if all(m in defenses for m in split_expression(e))]
    # several datasets joined by ',' (as `mechanisms` reads --dataset), each limited on its own
    datasets = study_config.parse_dataset_flags(split_dataset_spec(args.dataset))
    if args.limit:
        datasets = [{**d, "limit": args.limit} for d in datasets]
    raw = {"model": args.model, "out": args.out, "defenses": defenses, "ensembles": ensembles,
           "datasets": datasets, "device": args.device, "dtype": args.dtype, "readout": args.readout,
           "batch_size": args.batch_size, "n_boot": args.n_boot, "seed": args.seed,
           "generation_check": args.generation_check, "max_new_tokens": args.max_new_tokens,
           "title": "Demo: the study on the embedded toy", "intro": list(INTRO) if args.model == "toy" else []}
    return study_config.build(raw, "mechprobe demo", overwrite=args.overwrite)


def run(args) -> dict:
    result = run_config(config_of(args))
    return {"rows": result["summary"], "tables": result["tables"], **result}
