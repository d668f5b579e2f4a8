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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hooks import DECISION, hook_name
from probing.analysis.directions import refusal_directions
from probing.errors import InputError
from probing.score_table import ScoreTable

from .base import Defense, check_finite


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


@dataclass
class ActivationDefense(Defense):
    category: str = "ACT"
    directions: dict = field(default_factory=dict, repr=False)

    def _vec(self, layer: int, act: torch.Tensor) -> torch.Tensor:
        return self.directions[layer].to(device=act.device, dtype=act.dtype)


@dataclass
class Steer(ActivationDefense):
    name: str = "act_steer"
    alpha: float = 1.0
    layers: list = field(default_factory=list)

    def edits(self, bundle):
        return {hook_name(l, "hook_resid_post"): (lambda act, ctx, l=l: act + self.alpha * self._vec(l, act))
                for l in self.layers}


@dataclass
class ConditionalSteer(ActivationDefense):
    name: str = "act_conditional_steer"
    alpha: float = 1.0
    layers: list = field(default_factory=list)
    probe_layer: int = 0
    threshold: float = 0.0
    midpoint: float = 0.0

    def edits(self, bundle):
        state: dict[str, torch.Tensor] = {}
        unit = self.directions[self.probe_layer] / self.directions[self.probe_layer].norm()

        def probe(act, ctx):
            idx = DECISION.index(ctx.attention_mask, act.shape[0], act.shape[1], act.device)
            h = act[torch.arange(act.shape[0], device=act.device), idx[:, 0]]
            state["flag"] = ((h.float() @ unit.to(act.device)) - self.midpoint > self.threshold)
            return act

        def steer(act, ctx, l):
            flag = state["flag"].to(act.device)[:, None, None].to(act.dtype)
            return act + flag * self.alpha * self._vec(l, act)

        edits = {hook_name(self.probe_layer, "hook_resid_post"): probe}
        edits.update({hook_name(l, "hook_resid_post"): (lambda a, c, l=l: steer(a, c, l)) for l in self.layers})
        return edits


@dataclass
class Ablate(ActivationDefense):
    name: str = "act_ablate"
    layers: list = field(default_factory=list)
    offsets: dict = field(default_factory=dict, repr=False)  # layer -> projection kept on u

    def edits(self, bundle):
        def ablate(act, ctx, l):
            u = self._vec(l, act)
            u = u / u.norm()
            return act - ((act @ u) - self.offsets.get(l, 0.0))[..., None] * u

        return {hook_name(l, "hook_resid_post"): (lambda a, c, l=l: ablate(a, c, l)) for l in self.layers}


def act_steer(table: ScoreTable, alpha: float = 1.0, layers=None) -> Steer:
    alpha = check_finite("alpha", alpha)
    dirs = refusal_directions(table)
    chosen = _layers(layers, dirs)
    return Steer(params={"alpha": alpha, "layers": chosen}, directions=dirs, alpha=alpha, layers=chosen)


def act_conditional_steer(table: ScoreTable, probe_layer: int, alpha: float = 1.0, threshold: float = 0.0,
                          layers=None) -> ConditionalSteer:
    alpha, threshold = check_finite("alpha", alpha), check_finite("threshold", threshold)
    dirs = refusal_directions(table)
    if probe_layer not in dirs:
        raise InputError(f"parameter 'probe_layer': {probe_layer} not in the table's layers {sorted(dirs)}")
    chosen = _layers(layers if layers is not None else [l for l in dirs if l > probe_layer], dirs)
    if not chosen or min(chosen) <= probe_layer:
        raise InputError(f"parameter 'layers' must lie after probe_layer={probe_layer}, got {chosen}")
    unit = dirs[probe_layer] / dirs[probe_layer].norm()
    proj = table.hidden[:, table.layers.index(probe_layer)].double() @ unit.double()
    lab = table.labels
    mid = float((proj[[i for i, x in enumerate(lab) if x == "harmful"]].mean()
                 + proj[[i for i, x in enumerate(lab) if x == "benign"]].mean()) / 2)
    return ConditionalSteer(params={"alpha": alpha, "layers": chosen, "probe_layer": probe_layer,
                                    "threshold": threshold},
                            directions=dirs, alpha=alpha, layers=chosen, probe_layer=probe_layer,
                            threshold=threshold, midpoint=mid)


def act_ablate(table: ScoreTable, layers=None, center: str = "benign") -> Ablate:
    if center not in ("benign", "zero"):
        raise InputError(f"parameter 'center' must be 'benign' or 'zero', got {center!r}")
    dirs = refusal_directions(table)
    chosen = _layers(layers, dirs)
    offsets = {}
    if center == "benign":
        benign = [i for i, lab in enumerate(table.labels) if lab == "benign"]
        for l in chosen:
            u = dirs[l].double() / dirs[l].double().norm()
            offsets[l] = float((table.hidden[benign, table.layers.index(l)].double() @ u).mean())
    return Ablate(params={"layers": chosen, "center": center}, directions=dirs, layers=chosen, offsets=offsets)
