"""Ensembles of defenses.

- ``Compose(a, b, ...)`` ("a+b"): apply all together: transforms chained (a's, then b's on each
  of a's variants), models chained, activation edits of all members (same hook point: applied
  in order).
- Score-level ensembles over the members' separate runs: ``Either`` ("a|b", refuse if any
  refuses: max p_refuse), ``Both`` (min), ``Mean`` (mean p_refuse).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from probing.query import Query
from probing.score_table import ScoreTable

from .base import Defense


@dataclass
class Compose(Defense):
    members: list = field(default_factory=list)
    category: str = "ENSEMBLE"

    def __post_init__(self):
        if len(self.members) < 2:
            raise ValueError("Compose needs at least two defenses")
        self.name = "+".join(m.name for m in self.members)
        self.params = {m.name: dict(m.params) for m in self.members}
        positions = {m.edit_positions for m in self.members if m.edits.__func__ is not Defense.edits}
        if len(positions) > 1:
            raise ValueError(f"Compose: members edit at different positions {positions}")
        self.edit_positions = positions.pop() if positions else "all"
        self.aggregate = next((m.aggregate for m in self.members if m.aggregate != "mean"), "mean")

    def transform(self, queries, bundle):
        variants = [[(q, None)] for q in queries]
        for member in self.members:
            flat = [(i, q, spec) for i, vs in enumerate(variants) for q, spec in vs]
            outs = member.transform([Query(f"{q.id}", q.text, q.image, q.label, dict(q.meta)) for _, q, _ in flat],
                                    bundle)
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
        merged: dict = {}
        for member in self.members:
            for name, fn in member.edits(bundle).items():
                if name in merged:
                    first = merged[name]
                    merged[name] = lambda act, ctx, f=first, g=fn: g(f(act, ctx), ctx)
                else:
                    merged[name] = fn
        return merged


@dataclass
class ScoreLevel(Defense):
    """Runs every member separately and combines their p_refuse per query."""

    members: list = field(default_factory=list)
    category: str = "ENSEMBLE"
    op: str = "|"

    def __post_init__(self):
        if len(self.members) < 2:
            raise ValueError("a score-level ensemble needs at least two defenses")
        self.name = self.op.join(m.name for m in self.members)
        self.params = {m.name: dict(m.params) for m in self.members}

    def combine(self, p: torch.Tensor) -> torch.Tensor:  # [members, ...] -> [...]
        if self.op == "|":
            return p.max(0).values
        if self.op == "&":
            return p.min(0).values
        return p.mean(0)

    def score_with(self, scorer, queries, *, prompt, desc) -> ScoreTable:
        from .apply import _logit, score_defended

        tables = [score_defended(scorer, [Query(q.id, q.text, q.image, q.label, dict(q.meta)) for q in queries],
                                 m, prompt=prompt, desc=desc) for m in self.members]
        p = torch.stack([t.p_refuse.double() for t in tables])
        lens = torch.stack([torch.sigmoid(t.lens_margin.double()) for t in tables])
        first = tables[0]
        return ScoreTable(list(first.ids), list(first.labels), _logit(self.combine(p)), _logit(self.combine(lens)),
                          list(first.layers), None, dict(first.meta))


def Either(*members) -> ScoreLevel:
    return ScoreLevel(members=list(members), op="|")


def Both(*members) -> ScoreLevel:
    return ScoreLevel(members=list(members), op="&")


def Mean(*members) -> ScoreLevel:
    return ScoreLevel(members=list(members), op="~")
