"""The `Defense` interface: one object the scorer can apply.

A defense has a name, a category (SR, QR, NI, MO, ACT, ENSEMBLE) and any of three effects:

1. ``transform(queries, bundle)``: per query, K >= 1 variants ``(Query, PromptSpec)``: a system
   prompt, text around the request, an image transform, a caption replacing the image... It may
   call the model itself (captioning, intention analysis).
2. ``model(bundle)``: a different model (fine-tuned weights); default: the same.
3. ``edits(bundle)``: activation edits ``{hook name: fn(act, ctx) -> act}`` applied through
   `hooks.edit` during the scoring forward, at ``edit_positions``.

Multi-sample defenses (K > 1) aggregate their variants' scores with ``aggregate``: "mean" (mean
p_refuse) or "majority" (majority vote); see probing/aggregate.py for the exact formulas.

``plan(queries, bundle)`` turns the three effects into a `probing.plan.ScoringPlan`, which is all
the scorer ever sees: the scorer does not import this package.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable

from probing.errors import InputError
from probing.plan import ScoringPlan, Variant
from probing.query import Query
from probing.render import PromptSpec

CATEGORIES = ("SR", "QR", "NI", "MO", "ACT", "ENSEMBLE", "CUSTOM")


@dataclass
class Defense:
    """Base class: override the effects a defense has; the defaults change nothing."""

    name: str = "none"
    category: str = "CUSTOM"
    params: dict = field(default_factory=dict)
    aggregate: str = "mean"
    edit_positions: str = "all"

    def transform(self, queries: list[Query], bundle) -> list[list[Variant]]:
        return [[(q, PromptSpec())] for q in queries]

    def model(self, bundle):
        return bundle

    def edits(self, bundle) -> dict[str, Callable]:
        return {}

    def plan(self, queries: list[Query], bundle) -> ScoringPlan:
        """What the scorer runs: the model, each query's variants (built with that model),
        activation edits and the aggregation rule."""
        model = self.model(bundle)
        return ScoringPlan(self.name, self.transform(list(queries), model), bundle=model,
                           edits=self.edits(model), edit_positions=self.edit_positions,
                           aggregate=self.aggregate, record=self.describe())

    def describe(self) -> dict:
        return {"defense": self.name, "category": self.category, "params": dict(self.params),
                "aggregate": self.aggregate}


def check_finite(name: str, value: float) -> float:
    """``value`` as a float if it is a finite real number (a bool or a string is not one), or an
    `InputError` naming the parameter."""
    if isinstance(value, (bool, str, bytes)) or value is None:
        raise InputError(f"parameter {name!r} must be a number, got {value!r}")
    try:
        value = float(value)  # numpy and torch scalars too
    except (TypeError, ValueError):
        raise InputError(f"parameter {name!r} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise InputError(f"parameter {name!r} must be finite, got {value}")
    return value


def check_rate(name: str, value: float) -> float:
    value = check_finite(name, value)
    if not 0.0 <= value <= 1.0:
        raise InputError(f"parameter {name!r} must lie in [0, 1], got {value}")
    return value


def check_layers(name: str, layers, available) -> list[int]:
    """Layer indices that all exist in ``available`` (e.g. a table's directions), or an
    `InputError` naming the parameter, the bad indices and the valid ones."""
    try:
        chosen = [int(x) for x in layers]
    except (TypeError, ValueError):
        raise InputError(f"parameter {name!r} must be a list of layer indices, got {layers!r}") from None
    missing = [x for x in chosen if x not in available]
    if missing or not chosen:
        raise InputError(f"parameter {name!r}: no layer {missing or chosen} here; available: {sorted(available)}")
    return chosen


def check_int(name: str, value, minimum: int) -> int:
    """``value`` if it is an integer >= ``minimum`` (a bool is not one), or an `InputError` naming
    the parameter (a seed: ``minimum=0``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise InputError(f"parameter {name!r} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_samples(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"parameter 'k' (samples) must be an integer >= 1, got {k!r}")
    return k
