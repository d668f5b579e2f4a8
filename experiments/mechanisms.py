"""mechanisms: baseline plus a list of defenses on a dataset -> how each defense works.

    mechprobe mechanisms --defenses sr_self_reminder,qr_caption,mo_finetune --out runs/mechanisms

Writes tables/mechanisms.csv|json (refusal on harmful and benign, mean shift, distance change,
AUROC, d', label, 95% intervals), distributions.png and report.md.
"""

from __future__ import annotations

from tqdm.auto import tqdm

from probing.analysis import compare
from .plots import plot_distributions
from .report import markdown_table

from . import options
from .common import Session

COLUMNS = ["defense", "label", "refusal_harmful_def", "refusal_benign_def", "mean_shift", "distance_change",
           "auroc_base", "auroc_def", "dprime_base", "dprime_def"]


add_arguments = options.mechanisms  # the options live in experiments/options.py


def run(args) -> dict:
    s = Session(args, "mechanisms")
    names = [n for n in args.defenses.split(",") if n]
    tables = {"baseline": s.baseline}
    rows = []
    for name in tqdm(names, desc="mechanisms", unit="defense"):
        tables[name] = s.score(name, s.defense(name))
        eff = compare(s.baseline, tables[name], name=name, n_boot=args.n_boot, seed=args.seed)
        rows.append(eff.row())
    s.clear_outputs(tables=("mechanisms",), figures=("distributions.png",))
    s.run.write_table("mechanisms", rows)
    plot_distributions(tables, s.run.path / "distributions.png")
    s.report("Mechanisms", [
        ("Per defense (values; intervals in tables/mechanisms.csv)", markdown_table(rows, COLUMNS)),
        ("Distributions", "![harmful vs benign refusal scores](distributions.png)"),
    ])
    return {"rows": rows, "tables": tables}
