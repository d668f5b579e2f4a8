"""layerwise: the per-layer shift / separation decomposition of chosen defenses.

    mechprobe layerwise --defenses sr_self_reminder,mo_finetune --scores lens,diffmean,probe

Writes tables/layerwise.csv|json (one row per defense, score and layer, with intervals), one
curves plot per score (layers_<score>.png) and report.md.
"""

from __future__ import annotations

from tqdm.auto import tqdm

from probing.analysis import SCORES, layer_profile
from .plots import plot_layer_profiles

from . import options
from .common import Session


add_arguments = options.layerwise  # the options live in experiments/options.py


def run(args) -> dict:
    scores = [x for x in args.scores.split(",") if x]
    bad = [x for x in scores if x not in SCORES]
    if bad:
        raise ValueError(f"--scores: unknown {bad}; choose from {SCORES}")
    s = Session(args, "layerwise")
    names = [n for n in args.defenses.split(",") if n]
    rows, profiles = [], {sc: [] for sc in scores}
    for name in tqdm(names, desc="layerwise", unit="defense"):
        table = s.score(name, s.defense(name))
        for sc in scores:
            prof = layer_profile(s.baseline, table, sc, name=name, n_folds=args.folds,
                                 n_boot=max(50, args.n_boot // 5), seed=args.seed)
            profiles[sc].append(prof)
            rows += prof.rows()
    # every score's figure: one a run with other --scores drew would stay beside this report
    s.clear_outputs(tables=("layerwise",), figures=tuple(f"layers_{sc}.png" for sc in SCORES))
    s.run.write_table("layerwise", rows)
    sections = []
    for sc in scores:
        plot_layer_profiles(profiles[sc], s.run.path / f"layers_{sc}.png")
        first = ", ".join(f"{p.name}: {'none' if p.first_layer() is None else p.first_layer()}"
                          for p in profiles[sc])
        sections.append((f"Score: {sc}", f"First layer with a separation change of at least 0.5 SD: {first}\n\n"
                                          f"![per-layer curves ({sc})](layers_{sc}.png)"))
    s.report("Layerwise decomposition", sections)
    return {"rows": rows, "profiles": profiles}
