"""demo: the toy's test split under the baseline and every defense that needs only the model.

    mechprobe demo                      # about a minute on 2 CPU cores
    mechprobe demo --defenses sr_self_reminder,qr_caption_no_image

An experiment like the others (resumable run directory); writes summary.csv|json (refusal rates,
mean shift, distance change, AUROC, d' change and the mechanism label per defense), scores/ (one
ScoreTable per condition), distributions.png, layers.png and report.md.
"""

from __future__ import annotations

from tqdm.auto import tqdm

from probing.analysis import compare, layer_profile, refusal_rate

from . import options
from .common import Session
from .plots import plot_distributions, plot_layer_profiles
from .report import markdown_table, write_table

SHOWN = ("sr_self_reminder", "qr_caption", "mo_finetune", "act_ablate")
COLUMNS = ["condition", "n", "refusal_harmful", "refusal_benign", "mean_shift", "distance_change", "auroc",
           "auroc_change", "dprime_change", "label"]


add_arguments = options.demo  # the options live in experiments/options.py


def summary_row(name: str, table) -> dict:
    p = table.p_refuse.numpy()
    is_h = [lab == "harmful" for lab in table.labels]
    is_b = [lab == "benign" for lab in table.labels]
    h, b = p[is_h], p[is_b]
    return {"condition": name, "n": len(table),
            "refusal_harmful": float(refusal_rate(h)), "refusal_benign": float(refusal_rate(b)),
            "mean_p_refuse_harmful": float(h.mean()) if len(h) else None,
            "mean_p_refuse_benign": float(b.mean()) if len(b) else None}


def run(args) -> dict:
    s = Session(args, "demo")
    names = [n for n in args.defenses.split(",") if n]
    baseline = s.baseline
    tables = {"baseline": baseline}
    rows, profiles = [summary_row("baseline", baseline)], []
    for name in tqdm(names, desc="defenses", unit="defense"):
        table = s.score(name, s.defense(name))
        tables[name] = table
        eff = compare(baseline, table, name=name, n_boot=args.n_boot, seed=args.seed)
        row = summary_row(name, table)
        row.update({"mean_shift": eff["mean_shift"].value, "distance_change": eff["distance_change"].value,
                    "auroc": eff["auroc_def"].value, "auroc_change": eff["auroc_change"].value,
                    "dprime_change": eff["dprime_change"].value, "label": eff.label})
        rows.append(row)
        profiles.append(layer_profile(baseline, table, "lens", name=name, n_boot=max(20, args.n_boot // 5)))
    for name, table in tables.items():
        kept = table.select(table.ids)
        kept.hidden = None  # the shards keep hidden states; scores/ holds the scores only
        kept.save(s.run.path / "scores" / name)
    write_table(s.run.path / "summary", rows)
    shown = ["baseline"] + [n for n in SHOWN if n in tables]
    plot_distributions({n: tables[n] for n in shown}, s.run.path / "distributions.png")
    plot_layer_profiles([p for p in profiles if p.name in shown], s.run.path / "layers.png")
    s.report("Demo: defenses on the embedded toy", [
        ("Per condition", markdown_table(rows, COLUMNS)),
        ("Distributions", "![harmful vs benign refusal scores](distributions.png)"),
        ("Per layer (logit lens)", "![per-layer curves](layers.png)"),
    ])
    return {"rows": rows, "tables": tables}
