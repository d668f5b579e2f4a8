"""Where in depth a defense acts: the shift / separation decomposition for every layer.

Three per-layer scores, each compared between the baseline and the defended run:

- ``lens``: logit-lens margins from the ScoreTables (each layer's decision state through the
  final norm and the readout rows);
- ``diffmean``: projection on the baseline's harmful-minus-benign difference of means of that
  layer, estimated out of fold (cross-fitting: a query is projected on a direction fitted without
  it, nor any other delivery of its request), so baseline separation is not inflated;
- ``probe``: a cross-validated logistic-regression probe (scikit-learn) fitted on baseline hidden
  states of the other folds and applied to this fold's baseline and defended states (logit).

The folds are dealt by request group (`probing.analysis.folds`: the baseline rows'
``meta["group"]``, else the query id), stratified by label.

Shifts are in units of the baseline's pooled SD of that score at that layer, so layers compare.
Lens separation moving while diffmean / probe separation stays put means the defense moves the
refusal readout, not the harm signal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .compare import Estimate, Paired, bootstrap, pair_tables, separation_figures
from .folds import grouped_folds, groups_per_class
from ..score_table import ScoreTable
from ..errors import InputError

SCORES = ("lens", "diffmean", "probe")
FIGURES = ("shift_sd", "differential_sd", "auroc_base", "auroc_def", "auroc_change",
           "dprime_base", "dprime_def", "dprime_change")


@dataclass
class LayerProfile:
    """Per-layer figures: ``values[fig]``, ``lo[fig]``, ``hi[fig]`` are ``[L]`` arrays."""

    name: str
    score: str
    layers: list[int]
    values: dict[str, np.ndarray]
    lo: dict[str, np.ndarray]
    hi: dict[str, np.ndarray]

    def first_layer(self, figure: str = "differential_sd", min_effect: float = 0.5) -> int | None:
        """First layer whose interval lies above 0 with a value of at least ``min_effect``."""
        for i, layer in enumerate(self.layers):
            if self.lo[figure][i] > 0 and self.values[figure][i] >= min_effect:
                return layer
        return None

    def rows(self) -> list[dict]:
        out = []
        for i, layer in enumerate(self.layers):
            row = {"defense": self.name, "score": self.score, "layer": layer}
            for f in FIGURES:
                row[f], row[f + "_lo"], row[f + "_hi"] = self.values[f][i], self.lo[f][i], self.hi[f][i]
            out.append(row)
        return out


def stratified_folds(is_harmful: np.ndarray, n_folds: int, seed: int, *, ids=None, groups=None) -> np.ndarray:
    """Fold id per row, ``[N]``: whole groups dealt into folds, classes spread evenly
    (`probing.analysis.folds.grouped_folds`). ``ids`` name the rows (default: their positions, so
    the folds then depend on the row order); ``groups``: each row's group or None (default: every
    row its own group)."""
    ids = [str(i) for i in range(len(is_harmful))] if ids is None else [str(i) for i in ids]
    labels = ["harmful" if h else "benign" for h in is_harmful]
    folds = grouped_folds(ids, labels, groups, n_folds, seed)
    return np.array([folds[i] for i in ids], dtype=int)


def _check_folds(paired: Paired, n_folds: int) -> None:
    if n_folds < 2:
        raise InputError(f"n_folds must be >= 2, got {n_folds}")
    labels = ["harmful" if h else "benign" for h in paired.is_harmful]
    counts = groups_per_class(paired.ids, labels, paired.groups)
    cls = min(counts, key=counts.get)
    if counts[cls] < n_folds:
        raise InputError(f"n_folds={n_folds} but only {counts[cls]} groups hold {cls} queries (a group: the queries "
                         f"of one meta 'group', the deliveries of one request; else one query); lower n_folds")


def _paired_folds(paired: Paired, n_folds: int, seed: int) -> np.ndarray:
    _check_folds(paired, n_folds)
    return stratified_folds(paired.is_harmful, n_folds, seed, ids=paired.ids, groups=paired.groups)


def diffmean_scores(paired: Paired, n_folds: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold projections on the difference-of-means direction: ``[N, L]`` for each run (folds by
    ``paired.groups``, see `stratified_folds`)."""
    is_h = paired.is_harmful
    folds = _paired_folds(paired, n_folds, seed)
    base, dfd = paired.base, paired.defended  # [N, L, d]
    out0, out1 = np.empty(base.shape[:2]), np.empty(base.shape[:2])
    for k in range(n_folds):
        train, test = folds != k, folds == k
        direction = base[train & is_h].mean(0) - base[train & ~is_h].mean(0)  # [L, d], float64
        direction /= np.maximum(np.linalg.norm(direction, axis=-1, keepdims=True), 1e-12)
        out0[test] = np.einsum("nld,ld->nl", base[test], direction)
        out1[test] = np.einsum("nld,ld->nl", dfd[test], direction)
    return out0, out1


def probe_scores(paired: Paired, n_folds: int = 5, seed: int = 0, C: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold logistic-probe logits: ``[N, L]`` for each run (folds as `diffmean_scores`)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    is_h = paired.is_harmful
    folds = _paired_folds(paired, n_folds, seed)
    base, dfd = paired.base, paired.defended
    out0, out1 = np.empty(base.shape[:2]), np.empty(base.shape[:2])
    for layer in range(base.shape[1]):
        for k in range(n_folds):
            train, test = folds != k, folds == k
            probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
            probe.fit(base[train, layer], is_h[train])
            out0[test, layer] = probe.decision_function(base[test, layer])
            out1[test, layer] = probe.decision_function(dfd[test, layer])
    return out0, out1


def layer_profile(
    baseline: ScoreTable,
    defended: ScoreTable,
    score: str = "lens",
    *,
    name: str | None = None,
    n_folds: int = 5,
    n_boot: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> LayerProfile:
    """Per-layer shift / separation of one defense on one kind of per-layer score."""
    if score not in SCORES:
        raise InputError(f"score must be one of {SCORES}, got {score!r}")
    if baseline.layers != defended.layers:
        raise InputError(f"runs captured different layers: {baseline.layers} vs {defended.layers}")
    if score == "lens":
        paired = pair_tables(baseline, defended, "lens_margin")
    else:
        if baseline.hidden is None or defended.hidden is None:
            for which, table in (("baseline", baseline), ("defended", defended)):
                if table.hidden is None and table.meta.get("score_level"):
                    raise InputError(
                        f"score={score!r} needs hidden states, but the {which} run "
                        f"{table.meta.get('condition', '')!r} is a score-level ensemble (the "
                        f"{table.meta['score_level']} of its members' scores): it has no hidden states; use "
                        f"score='lens' (its members' lens margins combined the same way) or profile each member")
            raise InputError(f"score={score!r} needs hidden states: score both runs with keep_hidden=True")
        hidden = pair_tables(baseline, defended, "hidden")
        fn = diffmean_scores if score == "diffmean" else probe_scores
        s0, s1 = fn(hidden, n_folds=n_folds, seed=seed)
        paired = Paired(hidden.ids, hidden.is_harmful, s0, s1, hidden.groups)
    values, lo, hi = ({f: np.empty(len(baseline.layers)) for f in FIGURES} for _ in range(3))
    for i in range(len(baseline.layers)):
        layer = Paired(paired.ids, paired.is_harmful, paired.base[:, i], paired.defended[:, i], paired.groups)
        est: dict[str, Estimate] = bootstrap(separation_figures, layer, n_boot, seed, level, pairwise=False)
        for f in FIGURES:
            values[f][i], lo[f][i], hi[f][i] = est[f].value, est[f].lo, est[f].hi
    name = name or defended.meta.get("condition") or "defended"
    return LayerProfile(name, score, list(baseline.layers), values, lo, hi)
