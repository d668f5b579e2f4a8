"""Activation-level defenses: edits of the residual stream through `hooks.edit`.

The refusal direction of layer l is the difference of means of harmful and benign
decision-position states of a baseline run (a ScoreTable scored with ``keep_hidden=True``),
accumulated in float64:

    r_l = mean_harmful(h_l) - mean_benign(h_l)                 [d_model]

Directions are estimated on ``blocks.{l}.hook_resid_post`` (what ScoreTables store), and edits
are applied at that same hook point:

- ``act_steer``: add ``alpha * r_l`` at every position;
- ``act_conditional_steer``: the same, only for queries whose harm-probe score at ``probe_layer``
  (projection of the decision state on the unit direction, centred at the class midpoint)
  exceeds ``threshold``;
- ``act_ablate``: remove the harm signal along the unit direction u (a negative control that
  should lower refusal). ``center="benign"`` (default) sets every state's projection on u to
  the benign mean, x - (x.u - m_benign) u, so harmful states lose what separates them while
  benign ones barely move; ``center="zero"`` is the plain projection x - (x.u) u, which in a
  model whose benign states do not sit at 0 along u also moves benign queries.

Cross-fitting (default, ``cross_fit=True``): the direction table's labelled queries are dealt into
``n_folds`` folds stratified by label, whole request groups at a time (`crossfit_folds`: the rows'
``meta["group"]``, else the query id; `probing.analysis.folds`); a query of fold k is edited with
the direction (and offsets / midpoint) estimated on the other folds, so a defense is never
evaluated on the queries that estimated it, nor on another delivery of a request that did;
queries not in the table use the full-table estimate.
``describe()["cross_fit"]["folds"]`` (recorded in the run's meta) gives every query's fold.
``cross_fit=False`` is the old in-sample behaviour. Composed with other defenses ("a+b"), a
defense stays cross-fitted: `defenses.composite.Compose.plan` partitions the queries by its folds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from hooks import DECISION, hook_name
from probing.analysis.directions import refusal_directions
from probing.analysis.folds import grouped_folds, groups_per_class, row_groups
from probing.errors import InputError
from probing.plan import ScoringPlan
from probing.score_table import ScoreTable

from .base import Defense, check_finite

logger = logging.getLogger(__name__)


def _layers(layers, available: dict) -> list[int]:
    """None: every layer with a direction; "inner": all but the first and last (the embedding-side
    and readout-side layers, where an edit mostly breaks the model rather than moving refusal)."""
    if isinstance(layers, str):
        if layers != "inner":
            raise InputError(f"parameter 'layers' must be a list of layer indices, None or 'inner', got {layers!r}")
        ordered = sorted(available)
        layers = ordered[1:-1] if len(ordered) > 2 else ordered
    chosen = sorted(available) if layers is None else [int(x) for x in layers]
    missing = [x for x in chosen if x not in available]
    if missing:
        raise InputError(f"parameter 'layers': no direction for layers {missing}; the table has {sorted(available)}")
    return chosen


def crossfit_folds(table: ScoreTable, n_folds: int = 5, seed: int = 0) -> dict[str, int]:
    """Fold of every labelled query of the baseline table, ``{query id: fold}``: whole groups (the
    rows' ``meta["group"]``, else the query id) dealt into folds, classes spread evenly
    (`probing.analysis.folds.grouped_folds`). A fold depends on the ids, groups, labels and seed
    only (not on the table's row order), and both classes are in every fold. ``n_folds`` is
    lowered to the number of groups holding the smaller class when that is smaller (logged)."""
    groups = row_groups(table.row_meta)
    counts = groups_per_class(table.ids, table.labels, groups)
    smallest = min(counts.values())
    if smallest < 2:
        raise InputError(f"cross-fitting needs at least 2 groups (a group: the queries of one meta 'group', else one "
                         f"query) holding harmful and 2 holding benign queries in the direction table, got "
                         f"{counts['harmful']} and {counts['benign']}; pass cross_fit=False")
    if n_folds < 2:
        raise InputError(f"parameter 'n_folds' must be >= 2, got {n_folds}")
    if smallest < n_folds:
        logger.info("cross-fitting with %d folds instead of %d: only %d groups hold the smaller class",
                    smallest, n_folds, smallest)
        n_folds = smallest
    return grouped_folds(table.ids, table.labels, groups, n_folds, seed)


def _fit_rows(table: ScoreTable, folds: dict[str, int], k: int) -> list[int]:
    """Rows of the table that estimate fold k's direction: the labelled queries of other folds."""
    return [i for i, q in enumerate(table.ids) if q in folds and folds[q] != k]


@dataclass
class ActivationDefense(Defense):
    """Shared by the activation defenses: a fitted state (directions, and offsets or a midpoint)
    estimated on the whole direction table, and, when cross-fitted, one state per fold estimated
    without that fold's queries.

    Cross-fitting (the default): ``plan()`` partitions the queries by fold (`probing.plan`
    ScoringPlan.parts); a query of the direction table is edited with the state of its own fold
    (estimated on the other folds), a query not in the table with the full-table state. So a
    defense is never evaluated on the queries that estimated its direction. ``edits(bundle)``
    always uses the full-table state; `Compose.plan` keeps a composite cross-fitted through
    ``folds``, ``fold_states`` and ``make_edits``."""

    category: str = "ACT"
    directions: dict = field(default_factory=dict, repr=False)
    folds: dict = field(default_factory=dict, repr=False)         # query id -> fold
    fold_states: dict = field(default_factory=dict, repr=False)   # fold -> state (as `state()`)

    @staticmethod
    def _vec(directions: dict, layer: int, act: torch.Tensor) -> torch.Tensor:
        return directions[layer].to(device=act.device, dtype=act.dtype)

    def state(self) -> dict:
        """The full-table state the edits are built from."""
        return {"directions": self.directions}

    def make_edits(self, state: dict) -> dict:
        raise NotImplementedError

    def edits(self, bundle):
        return self.make_edits(self.state())

    @property
    def cross_fit(self) -> bool:
        return bool(self.folds)

    def describe(self) -> dict:
        out = super().describe()
        if self.cross_fit:
            out["cross_fit"] = {
                "n_folds": len(self.fold_states), "folds": dict(self.folds),
                "rule": "a query of fold k is edited with the direction estimated on the labelled queries of "
                        "the other folds; queries not in the direction table use the full-table direction",
                "unit": "request group: the queries of one meta 'group' (else one query) share a fold",
            }
        return out

    def plan(self, queries, bundle) -> ScoringPlan:
        queries = list(queries)
        groups: dict[int, list[int]] = {}
        for i, q in enumerate(queries):
            groups.setdefault(self.folds.get(q.id, -1), []).append(i)
        if not self.cross_fit or list(groups) == [-1]:
            return super().plan(queries, bundle)
        model = self.model(bundle)
        parts = []
        for k, idx in sorted(groups.items()):
            sub = [queries[i] for i in idx]
            state = self.state() if k == -1 else self.fold_states[k]
            parts.append((idx, ScoringPlan(self.name, self.transform(sub, model), bundle=model,
                                           edits=self.make_edits(state), edit_positions=self.edit_positions,
                                           aggregate=self.aggregate, record={"fold": "full" if k == -1 else k})))
        return ScoringPlan(self.name, bundle=model, parts=parts, record=self.describe())


@dataclass
class Steer(ActivationDefense):
    name: str = "act_steer"
    alpha: float = 1.0
    layers: list = field(default_factory=list)

    def make_edits(self, state):
        dirs = state["directions"]
        return {hook_name(l, "hook_resid_post"): (lambda act, ctx, l=l: act + self.alpha * self._vec(dirs, l, act))
                for l in self.layers}


@dataclass
class ConditionalSteer(ActivationDefense):
    name: str = "act_conditional_steer"
    alpha: float = 1.0
    layers: list = field(default_factory=list)
    probe_layer: int = 0
    threshold: float = 0.0
    midpoint: float = 0.0

    def state(self):
        return {"directions": self.directions, "midpoint": self.midpoint}

    def make_edits(self, state):
        flags: dict[str, torch.Tensor] = {}
        dirs, midpoint = state["directions"], state["midpoint"]
        unit = dirs[self.probe_layer] / dirs[self.probe_layer].norm()

        def probe(act, ctx):
            idx = DECISION.index(ctx.attention_mask, act.shape[0], act.shape[1], act.device)
            h = act[torch.arange(act.shape[0], device=act.device), idx[:, 0]]
            flags["flag"] = ((h.float() @ unit.to(act.device)) - midpoint > self.threshold)
            return act

        def steer(act, ctx, l):
            flag = flags["flag"].to(act.device)[:, None, None].to(act.dtype)
            return act + flag * self.alpha * self._vec(dirs, l, act)

        edits = {hook_name(self.probe_layer, "hook_resid_post"): probe}
        edits.update({hook_name(l, "hook_resid_post"): (lambda a, c, l=l: steer(a, c, l)) for l in self.layers})
        return edits


@dataclass
class Ablate(ActivationDefense):
    name: str = "act_ablate"
    layers: list = field(default_factory=list)
    offsets: dict = field(default_factory=dict, repr=False)  # layer -> projection kept on u

    def state(self):
        return {"directions": self.directions, "offsets": self.offsets}

    def make_edits(self, state):
        dirs, offsets = state["directions"], state["offsets"]

        def ablate(act, ctx, l):
            u = self._vec(dirs, l, act)
            u = u / u.norm()
            return act - ((act @ u) - offsets.get(l, 0.0))[..., None] * u

        return {hook_name(l, "hook_resid_post"): (lambda a, c, l=l: ablate(a, c, l)) for l in self.layers}


def _crossfit(table: ScoreTable, fit, cross_fit: bool, n_folds: int, seed: int) -> tuple[dict, dict]:
    """(folds, {fold: fit(rows of the other folds)}) or ({}, {}) without cross-fitting."""
    if not cross_fit:
        return {}, {}
    folds = crossfit_folds(table, n_folds, seed)
    return folds, {k: fit(_fit_rows(table, folds, k)) for k in sorted(set(folds.values()))}


def _crossfit_params(cross_fit: bool, folds: dict, seed: int) -> dict:
    return {"cross_fit": bool(cross_fit), "n_folds": len(set(folds.values())) if folds else None,
            "fold_seed": int(seed)}


def act_steer(table: ScoreTable, alpha: float = 1.0, layers=None, *, cross_fit: bool = True, n_folds: int = 5,
              seed: int = 0) -> Steer:
    """Add ``alpha * r_l`` at every position of the chosen layers. ``cross_fit`` (default): the
    table's own queries are steered with directions estimated on other folds (see
    `ActivationDefense`); ``cross_fit=False``: one direction from the whole table for every query."""
    alpha = check_finite("alpha", alpha)
    dirs = refusal_directions(table)
    chosen = _layers(layers, dirs)
    folds, states = _crossfit(table, lambda rows: {"directions": refusal_directions(table, rows)},
                              cross_fit, n_folds, seed)
    return Steer(params={"alpha": alpha, "layers": chosen, **_crossfit_params(cross_fit, folds, seed)},
                 directions=dirs, folds=folds, fold_states=states, alpha=alpha, layers=chosen)


def _midpoint(table: ScoreTable, rows, probe_layer: int, dirs: dict) -> float:
    unit = dirs[probe_layer].double() / dirs[probe_layer].double().norm()
    rows = range(len(table)) if rows is None else rows
    proj = {i: float(table.hidden[i, table.layers.index(probe_layer)].double() @ unit) for i in rows}
    h = [v for i, v in proj.items() if table.labels[i] == "harmful"]
    b = [v for i, v in proj.items() if table.labels[i] == "benign"]
    return float((np.mean(h) + np.mean(b)) / 2)


def act_conditional_steer(table: ScoreTable, probe_layer: int, alpha: float = 1.0, threshold: float = 0.0,
                          layers=None, *, cross_fit: bool = True, n_folds: int = 5, seed: int = 0) -> ConditionalSteer:
    alpha, threshold = check_finite("alpha", alpha), check_finite("threshold", threshold)
    dirs = refusal_directions(table)
    if probe_layer not in dirs:
        raise InputError(f"parameter 'probe_layer': {probe_layer} not in the table's layers {sorted(dirs)}")
    chosen = _layers(layers if layers is not None else [l for l in dirs if l > probe_layer], dirs)
    if not chosen or min(chosen) <= probe_layer:
        raise InputError(f"parameter 'layers' must lie after probe_layer={probe_layer}, got {chosen}")

    def fit(rows):
        d = refusal_directions(table, rows)
        return {"directions": d, "midpoint": _midpoint(table, rows, probe_layer, d)}

    folds, states = _crossfit(table, fit, cross_fit, n_folds, seed)
    return ConditionalSteer(params={"alpha": alpha, "layers": chosen, "probe_layer": probe_layer,
                                    "threshold": threshold, **_crossfit_params(cross_fit, folds, seed)},
                            directions=dirs, folds=folds, fold_states=states, alpha=alpha, layers=chosen,
                            probe_layer=probe_layer, threshold=threshold,
                            midpoint=_midpoint(table, None, probe_layer, dirs))


def _offsets(table: ScoreTable, rows, chosen: list[int], dirs: dict, center: str) -> dict:
    if center != "benign":
        return {}
    rows = range(len(table)) if rows is None else rows
    benign = [i for i in rows if table.labels[i] == "benign"]
    out = {}
    for l in chosen:
        u = dirs[l].double() / dirs[l].double().norm()
        out[l] = float((table.hidden[benign, table.layers.index(l)].double() @ u).mean())
    return out


def act_ablate(table: ScoreTable, layers=None, center: str = "benign", *, cross_fit: bool = True, n_folds: int = 5,
               seed: int = 0) -> Ablate:
    if center not in ("benign", "zero"):
        raise InputError(f"parameter 'center' must be 'benign' or 'zero', got {center!r}")
    dirs = refusal_directions(table)
    chosen = _layers(layers, dirs)

    def fit(rows):
        d = refusal_directions(table, rows)
        return {"directions": d, "offsets": _offsets(table, rows, chosen, d, center)}

    folds, states = _crossfit(table, fit, cross_fit, n_folds, seed)
    return Ablate(params={"layers": chosen, "center": center, **_crossfit_params(cross_fit, folds, seed)},
                  directions=dirs, folds=folds, fold_states=states, layers=chosen,
                  offsets=_offsets(table, None, chosen, dirs, center))
