"""Ensembles of defenses.

- ``Compose(a, b, ...)`` ("a+b"): apply all together: transforms chained (a's, then b's on each
  of a's variants), models chained, activation edits of all members (same hook point: applied
  in order). A member whose only effect is its own plan (a score-level ensemble) is refused.
- Score-level ensembles over the members' separate runs: ``Either`` ("a|b", refuse if any
  refuses: max p_refuse), ``Both`` (min), ``Mean`` (mean p_refuse); the formulas live in
  probing/aggregate.py and the scorer applies them to the members' finished tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from probing.aggregate import OPERATORS
from probing.errors import InputError
from probing.plan import ScoringPlan

from .base import Defense


@dataclass
class Compose(Defense):
    members: list = field(default_factory=list)
    category: str = "ENSEMBLE"

    def __post_init__(self):
        if len(self.members) < 2:
            raise InputError("Compose needs at least two defenses")
        for m in self.members:
            _check_member(m, self.members)
        self.name = "+".join(m.name for m in self.members)
        self.params = {m.name: dict(m.params) for m in self.members}
        positions = {m.edit_positions for m in self.members if m.edits.__func__ is not Defense.edits}
        if len(positions) > 1:
            raise InputError(f"Compose: members edit at different positions {positions}")
        self.edit_positions = positions.pop() if positions else "all"
        self.aggregate = next((m.aggregate for m in self.members if m.aggregate != "mean"), "mean")

    def transform(self, queries, bundle):
        variants = [[(q, None)] for q in queries]
        for member in self.members:
            flat = [(i, q, spec) for i, vs in enumerate(variants) for q, spec in vs]
            outs = member.transform([q for _, q, _ in flat], bundle)
            nxt: list[list] = [[] for _ in queries]
            for (i, _, spec), out in zip(flat, outs):
                for q2, spec2 in out:
                    nxt[i].append((q2, spec2 if spec is None else spec.merged(spec2)))
            variants = nxt
        return [[(q, spec) for q, spec in vs] for vs in variants]

    def model(self, bundle):
        for member in self.members:
            bundle = member.model(bundle)
        return bundle

    def edits(self, bundle):
        return self._merge([member.edits(bundle) for member in self.members])

    @staticmethod
    def _merge(edit_sets: list[dict]) -> dict:
        """Members' edits in member order; two at the same hook point are chained."""
        merged: dict = {}
        for edits in edit_sets:
            for name, fn in edits.items():
                if name in merged:
                    first = merged[name]
                    merged[name] = lambda act, ctx, f=first, g=fn: g(f(act, ctx), ctx)
                else:
                    merged[name] = fn
        return merged

    def plan(self, queries, bundle) -> ScoringPlan:
        """Cross-fitted members (activation defenses with ``fold_states``) stay cross-fitted inside the
        composite: the queries are partitioned by their folds and each part is edited with the states
        estimated without it, exactly as the member alone would edit them."""
        queries = list(queries)
        fitted = [m for m in self.members if getattr(m, "cross_fit", False) and getattr(m, "fold_states", None)]
        if not fitted:
            return super().plan(queries, bundle)
        model = self.model(bundle)
        groups: dict[tuple, list[int]] = {}
        for i, q in enumerate(queries):
            groups.setdefault(tuple(m.folds.get(q.id, -1) for m in fitted), []).append(i)
        parts = []
        for key, idx in sorted(groups.items()):
            fold = {id(m): k for m, k in zip(fitted, key)}
            edits = self._merge([m.make_edits(m.fold_states[fold[id(m)]]) if fold.get(id(m), -1) != -1
                                 else m.edits(model) for m in self.members])
            sub = [queries[i] for i in idx]
            parts.append((idx, ScoringPlan(self.name, self.transform(sub, model), bundle=model, edits=edits,
                                           edit_positions=self.edit_positions, aggregate=self.aggregate,
                                           record={"folds": list(key)})))
        return ScoringPlan(self.name, bundle=model, parts=parts, record=self.describe())


def _check_member(member, members) -> None:
    """A composite applies its members' transform, model and edits: a member whose only effect is
    its own `plan` (a score-level ensemble) would be dropped silently, so it is refused."""
    own = {f: getattr(type(member), f, None) is not getattr(Defense, f)
           for f in ("plan", "transform", "model", "edits")}
    if not own["plan"] or own["transform"] or own["model"] or own["edits"]:
        return
    if isinstance(member, ScoreLevel):
        instead = member.op.join("+".join(alt.name if m is member else m.name for m in members)
                                 for alt in member.members)
        raise InputError(f"Compose: member {member.name!r} is a score-level ensemble, which inside '+' would change "
                         f"nothing; put the '+' inside each of its members instead: {instead!r}")
    raise InputError(f"Compose: member {member.name!r} only overrides plan(), which a '+' composite does not use "
                     "(it applies its members' transform, model and edits); score it on its own, or combine "
                     "scores with Either/Both/Mean")


@dataclass
class ScoreLevel(Defense):
    """Runs every member separately and combines their p_refuse per query."""

    members: list = field(default_factory=list)
    category: str = "ENSEMBLE"
    op: str = "|"

    def __post_init__(self):
        if len(self.members) < 2:
            raise InputError("a score-level ensemble needs at least two defenses")
        self.name = self.op.join(m.name for m in self.members)
        self.params = {m.name: dict(m.params) for m in self.members}

    def plan(self, queries, bundle) -> ScoringPlan:
        """Each member planned on its own; the scorer combines their finished tables per query."""
        return ScoringPlan(self.name, members=[m.plan(queries, bundle) for m in self.members],
                           combine=OPERATORS[self.op], record=self.describe())


def Either(*members) -> ScoreLevel:
    return ScoreLevel(members=list(members), op="|")


def Both(*members) -> ScoreLevel:
    return ScoreLevel(members=list(members), op="&")


def Mean(*members) -> ScoreLevel:
    return ScoreLevel(members=list(members), op="~")
