"""ensembles: intra- and inter-mechanism pairs, "+" and "|", predicted and measured; Pareto plot.

    mechprobe ensembles --defenses sr_self_reminder,qr_caption,mo_finetune --weight 0.5

Each "+" pair is predicted from the single runs (logit additivity) and measured by running the
composite (the members' own instances: a fine-tune is trained once per run and saved, captions
cached, `experiments.kept`); the ranking uses the measurement, with the prediction and its errors
beside. A "|" pair is no measurement: `rank_ensembles` combines the members' finished tables (the
max p_refuse, what scoring it would give, without a forward), source "exact", and its error
columns stay empty (an error of the combination against itself would be 0 by construction).
tables/ensembles.csv: source, safety, helpfulness, utility, the Pareto flag, predicted_* and the
errors; tradeoff.png shows the front.
"""

from __future__ import annotations

import itertools

from tqdm.auto import tqdm

from probing.analysis import compare
from probing.analysis import rank_ensembles
from .plots import plot_tradeoff
from .report import markdown_table

from . import options
from .common import Session


add_arguments = options.ensembles  # the options live in experiments/options.py


def run(args) -> dict:
    s = Session(args, "ensembles")
    names = [n for n in args.defenses.split(",") if n]
    if len(names) < 2:
        raise ValueError("--defenses: give at least two defenses to combine")
    ops = [o for o in args.ops.split(",") if o]
    singles, labels = {}, {}
    for name in tqdm(names, desc="singles", unit="defense"):
        singles[name] = s.score(name, s.defense(name))
        labels[name] = compare(s.baseline, singles[name], name=name, n_boot=args.n_boot, seed=args.seed).label
    # Only "+" pairs are measured (scored as composites, with the members' own instances: a fine-tune
    # trained once). A "|" pair is combined from the singles' tables by rank_ensembles itself
    # (source "exact"): passed here as a measurement it would be compared with itself.
    measured = {}
    if "+" in ops:
        for a, b in tqdm(list(itertools.combinations(names, 2)), desc="pairs", unit="pair"):
            name = f"{a}+{b}"
            measured[name] = s.score(name, s.defense(name))
    cands = rank_ensembles(s.baseline, singles, ops=tuple(ops), weight=args.weight, measured=measured)
    rows = []
    for c in cands:
        kind = "intra" if c.kind in ("+", "|") and len({labels[m] for m in c.name.replace("|", "+").split("+")}) == 1 \
            else ("inter" if c.kind in ("+", "|") else "")
        rows.append({"name": c.name, "kind": c.kind, "mechanisms": kind, "source": c.source, "safety": c.safety,
                     "helpfulness": c.helpfulness, "utility": c.utility, "pareto": c.pareto,
                     "measured_safety": c.measured_safety, "measured_helpfulness": c.measured_helpfulness,
                     "predicted_safety": c.predicted_safety, "predicted_helpfulness": c.predicted_helpfulness,
                     "safety_error": c.safety_error, "helpfulness_error": c.helpfulness_error,
                     "margin_rmse": c.margin_rmse, "margin_corr": c.margin_corr})
    s.clear_outputs(tables=("ensembles",), figures=("tradeoff.png",))
    s.run.write_table("ensembles", rows)
    plot_tradeoff(cands, s.run.path / "tradeoff.png")
    s.report("Ensembles", [
        ("Single-defense mechanisms", markdown_table([{"defense": k, "label": v} for k, v in labels.items()],
                                                     ["defense", "label"])),
        (f"Ranked by {args.weight} x safety + {1 - args.weight:.2f} x helpfulness (measured values; "
         "'exact' = score-level ensemble of measured members; 'predicted' = '+' pair not run)",
         markdown_table(rows, ["name", "kind", "mechanisms", "source", "safety", "helpfulness", "utility", "pareto",
                               "predicted_safety", "predicted_helpfulness", "margin_rmse"])),
        ("Trade-off", "![safety vs helpfulness](tradeoff.png)"),
    ])
    return {"rows": rows, "candidates": cands}
