"""Analysis of ScoreTables (and nothing else): what a defense does and where.

| module | question |
|---|---|
| `metrics` | AUROC, d', pooled SD, refusal rate, bootstrap indices and intervals |
| `compare` | output level: safety shift vs harmfulness discrimination, with intervals and a label |
| `layers` | the same decomposition per layer (logit lens, diff-of-means, probes) |
| `folds` | cross-fitting folds of whole request groups, stratified by label |
| `prediction` | exact score-level ensembles and "+" predictions from single runs, ranking, Pareto front |
| `directions` | harmful-minus-benign directions per layer |

    from probing.analysis import compare, layer_profile
    effect = compare(baseline, defended)
"""

from .compare import (LABELS, METHODS, DefenseEffect, Estimate, Paired, bootstrap, compare, fitted_cut,
                      fitted_threshold, interval_arrays, mechanism_label, neutral_threshold, output_figures,
                      pair_tables, rank_figures, resolve_threshold, separation_figures, threshold_cut)
from .directions import refusal_directions
from .layers import SCORES, LayerProfile, diffmean_scores, layer_profile, probe_scores, stratified_folds
from .metrics import (auroc, compliance_rate, criterion, d_prime, design_effect, hodges_lehmann,
                      hodges_lehmann_shift, order_quantile, percentile_ci, pooled_sd, refusal_rate, stratified_indices,
                      wilson_ci)
from .prediction import (PREDICTORS, Candidate, ComposeModel, combine, evaluate_prediction, fit_compose,
                         pareto_mask, predict, rank_ensembles, safety_helpfulness)

__all__ = [
    "LABELS", "METHODS", "DefenseEffect", "Estimate", "Paired", "bootstrap", "compare", "fitted_cut",
    "fitted_threshold", "interval_arrays", "mechanism_label", "neutral_threshold", "output_figures", "pair_tables",
    "rank_figures", "resolve_threshold", "separation_figures", "threshold_cut", "criterion", "hodges_lehmann",
    "hodges_lehmann_shift", "order_quantile", "wilson_ci", "design_effect", "refusal_directions", "SCORES", "LayerProfile",
    "diffmean_scores",
    "layer_profile", "probe_scores", "stratified_folds", "auroc", "compliance_rate", "d_prime", "percentile_ci", "pooled_sd",
    "refusal_rate", "stratified_indices", "Candidate", "evaluate_prediction", "pareto_mask", "predict",
    "rank_ensembles", "safety_helpfulness", "PREDICTORS", "ComposeModel", "combine", "fit_compose",
]
