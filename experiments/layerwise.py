"""layerwise: the per-layer shift / separation decomposition of chosen defenses.

    mechprobe layerwise --defenses sr_self_reminder,mo_finetune --scores lens,diffmean,probe

Writes tables/layerwise.csv|json (one row per defense, score and layer, with intervals), one
curves plot per score (layers_<score>.png) and report.md. A score-level ensemble ("a|b") has
scores but no hidden states: it gets a lens profile and no diffmean / probe one (said in the
report, as in the study).
"""

from __future__ import annotations

import logging

from tqdm.auto import tqdm

from probing.analysis import SCORES, layer_profile
from probing.errors import InputError
from .plots import plot_layer_profiles

from . import options
from .common import HIDDEN_SCORES, NO_HIDDEN_SCORE_LEVEL, Session, check_layer_folds, is_score_level

logger = logging.getLogger(__name__)

add_arguments = options.layerwise  # the options live in experiments/options.py


def profiled(names: list[str], scores: list[str]) -> dict[str, list[str]]:
    """Which defenses each score profiles: every one for lens, all but the score-level ensembles
    for diffmean / probe. A score left with none is an error (nothing to compute), before any forward."""
    out = {sc: [n for n in names if sc not in HIDDEN_SCORES or not is_score_level(n)] for sc in scores}
    for sc, kept in out.items():
        if not kept:
            raise InputError(f"--scores {sc}: none of --defenses {','.join(names)} can be profiled ({sc} reads "
                             f"hidden states and {NO_HIDDEN_SCORE_LEVEL}); profile its members, or use --scores lens")
    return out


def run(args) -> dict:
    scores = [x for x in args.scores.split(",") if x]
    bad = [x for x in scores if x not in SCORES]
    if bad:
        raise InputError(f"--scores: unknown {bad}; choose from {SCORES}")
    names = [n.strip() for n in args.defenses.split(",") if n.strip()]
    which = profiled(names, scores)
    skipped = {sc: [n for n in names if n not in which[sc]] for sc in scores}
    for sc, left_out in skipped.items():
        for name in left_out:
            logger.warning("no %s profile of %s: %s", sc, name, NO_HIDDEN_SCORE_LEVEL)
    s = Session(args, "layerwise",
                check=lambda qs: check_layer_folds(qs, scores, args.folds, "--folds",
                                                   "lower --folds or raise --limit"))
    rows, profiles = [], {sc: [] for sc in scores}
    for name in tqdm(names, desc="layerwise", unit="defense"):
        table = s.score(name, s.defense(name))
        for sc in scores:
            if name not in which[sc]:
                continue
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
        note = (f"\n\nNot profiled: {', '.join(skipped[sc])} ({NO_HIDDEN_SCORE_LEVEL})." if skipped[sc] else "")
        sections.append((f"Score: {sc}", f"First layer with a separation change of at least 0.5 SD: {first}{note}\n\n"
                                          f"![per-layer curves ({sc})](layers_{sc}.png)"))
    s.report("Layerwise decomposition", sections)
    return {"rows": rows, "profiles": profiles}
