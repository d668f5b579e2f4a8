"""How well is "a+b" (apply both defenses) predicted from the single runs? Measured on the toy and
on tiny-random.

    HF_HUB_OFFLINE=1 python benchmarks/ensemble_prediction.py              # both models, about 3 min on 2 CPU cores
    HF_HUB_OFFLINE=1 python benchmarks/ensemble_prediction.py --model toy

For every pair of single defenses the pair is run (`Compose`) and compared with two predictions:
"additive" (baseline + delta_a + delta_b per query, logit additivity) and "calibrated" (the
`ComposeModel` slope * (delta_a + delta_b) + interaction * delta_a * delta_b, fitted by least
squares on the *other* measured pairs: leave one pair out). Columns: margin RMSE and correlation
(predicted vs measured, per query), refusal rates on harmful / benign (predicted vs measured),
the mechanism label of compare() for the predicted and the measured table, and whether the pair
must be measured (a refusal rate off by more than 0.05, or another label). Score-level ensembles
("|", "&", "~") are not in the table: they are exact functions of the members (error 0).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SINGLES = {"toy": ("sr_self_reminder", "sr_mmsafety", "sr_adashield_s", "qr_caption_no_image"),
           "tiny-random": ("sr_self_reminder", "sr_mmsafety", "sr_adashield_s")}


def queries(model: str):
    from probing.datasets import toy

    qs = toy.requests("test")
    return qs if model == "toy" else [q for q in qs if not q.has_image]  # tiny-random: 576 image tokens each


def run(model: str, n_boot: int = 200) -> list[dict]:
    from defenses import Compose, get_defense
    from probing import RefusalScorer, load_model
    from probing.analysis import compare, evaluate_prediction, fit_compose, predict, safety_helpfulness

    bundle = load_model(model) if model == "toy" else load_model(model, seed=0)
    qs = queries(model)
    scorer = RefusalScorer(bundle, batch_size=16, progress=False)
    base = scorer.score(qs)
    names = SINGLES[model]
    singles = {n: scorer.score(qs, defense=get_defense(n)) for n in names}
    measured = {f"{a}+{b}": scorer.score(qs, defense=Compose(members=[get_defense(a), get_defense(b)]))
                for a, b in itertools.combinations(names, 2)}
    rows = []
    for a, b in itertools.combinations(names, 2):
        m = measured[f"{a}+{b}"]
        ms, mh = safety_helpfulness(m)
        m_label = compare(base, m, n_boot=n_boot).label
        for how in ("additive", "calibrated"):
            fit = fit_compose(base, singles, measured, exclude=(a, b)) if how == "calibrated" else None
            pred = predict(base, {a: singles[a], b: singles[b]}, "+", model=fit)
            ev = evaluate_prediction(pred, m)
            ps, ph = safety_helpfulness(pred)
            p_label = compare(base, pred, n_boot=n_boot).label
            rows.append({
                "model": model, "pair": f"{a}+{b}", "predictor": how,
                "fit": "" if fit is None else f"{fit.slope:.2f}, {fit.interaction:+.3f}",
                "rmse": ev["margin_rmse"], "corr": ev["margin_corr"],
                "refusal_h": f"{ps:.2f} / {ms:.2f}",
                "refusal_b": f"{1 - ph:.2f} / {1 - mh:.2f}",
                "label": p_label if p_label == m_label else f"{p_label} / {m_label}",
                "measure": "yes" if abs(ps - ms) > 0.05 or abs(ph - mh) > 0.05 or p_label != m_label else "no",
            })
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("toy", "tiny-random", "both"), default="both")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    t0 = time.time()
    models = ("toy", "tiny-random") if args.model == "both" else (args.model,)
    rows = [r for m in models for r in run(m)]
    print("| model | pair | predictor | fit (slope, interaction) | margin RMSE | corr | refusal harmful pred / meas "
          "| refusal benign pred / meas | label (pred / meas) | must measure |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['pair']} | {r['predictor']} | {r['fit']} | {r['rmse']:.3f} | {r['corr']:.3f} | "
              f"{r['refusal_h']} | {r['refusal_b']} | {r['label']} | {r['measure']} |")
    print(f"\n{time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
