"""Analysis of ScoreTables (and nothing else): what a defense does and where.

| module | question |
|---|---|
| `metrics` | AUROC, d', pooled SD, refusal rate, bootstrap indices and intervals |
| `compare` | output level: safety shift vs harmfulness discrimination, with intervals and a label |
| `layers` | the same decomposition per layer (logit lens, diff-of-means, probes) |
| `prediction` | ensembles predicted from single runs, ranking, Pareto front |
| `directions` | harmful-minus-benign directions per layer |

    from probing.analysis import compare, layer_profile
    effect = compare(baseline, defended)
"""

from .compare import (LABELS, DefenseEffect, Estimate, Paired, bootstrap, compare, mechanism_label,
                      output_figures, pair_tables, separation_figures)
from .directions import refusal_directions
from .layers import SCORES, LayerProfile, diffmean_scores, layer_profile, probe_scores, stratified_folds
from .metrics import auroc, compliance_rate, d_prime, percentile_ci, pooled_sd, refusal_rate, stratified_indices
from .prediction import (Candidate, evaluate_prediction, pareto_mask, predict, rank_ensembles,
                         safety_helpfulness)

__all__ = [
    "LABELS", "DefenseEffect", "Estimate", "Paired", "bootstrap", "compare", "mechanism_label", "output_figures",
    "pair_tables", "separation_figures", "refusal_directions", "SCORES", "LayerProfile", "diffmean_scores",
    "layer_profile", "probe_scores", "stratified_folds", "auroc", "compliance_rate", "d_prime", "percentile_ci", "pooled_sd",
    "refusal_rate", "stratified_indices", "Candidate", "evaluate_prediction", "pareto_mask", "predict",
    "rank_ensembles", "safety_helpfulness",
]
