"""Scoring plans: what a defense asks the scorer to run, so the scorer never imports defenses.

A defense (defenses/) turns queries into a `ScoringPlan`; `run_plan` executes it with a
`RefusalScorer`:

    plan.variants[i]  = K >= 1 (Query, PromptSpec) variants of query i (a system prompt, text
                        around the request, a perturbed image, a caption replacing the image ...)
    plan.bundle       = the model to score with (a fine-tuned copy), or None for the scorer's own
    plan.edits        = activation edits {hook name: fn(act, ctx)} applied through `hooks.edit`
    plan.aggregate    = how K variants' margins fold into one (probing.aggregate)
    plan.members      = score-level ensembles: member plans scored separately, combined per query
                        with `plan.combine` ("max" for a|b, "min" for a&b, "mean" for a~b); the
                        table has no hidden states (`combine_tables`)
    plan.parts        = a partition of the queries: ``[(indices, plan), ...]``, each part scored
                        with its own plan (cross-fitted activation defenses: each fold's queries
                        are edited with directions estimated on the other folds); rows come back
                        in input order, with the partitioned plan's record as meta (what a part
                        records about itself, e.g. its "fold", is left out)

Variant rows get ids ``<id>#<k>`` while scoring (K > 1) and are folded back to one row per query
in input order.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch

from hooks import edit

from .aggregate import combine_margins
from .errors import InputError, ScoringError
from .prefix import score_variant_groups
from .query import Query
from .render import PromptSpec
from .score_table import ScoreTable

logger = logging.getLogger(__name__)
Variant = tuple[Query, PromptSpec]


@dataclass
class ScoringPlan:
    """One condition's work for the scorer (see the module docstring)."""

    name: str
    variants: list[list[Variant]] = field(default_factory=list)
    bundle: object | None = None
    edits: dict[str, Callable] = field(default_factory=dict)
    edit_positions: str = "all"
    aggregate: str = "mean"
    record: dict = field(default_factory=dict)
    members: list["ScoringPlan"] = field(default_factory=list)
    combine: str | None = None
    parts: list[tuple[list[int], "ScoringPlan"]] = field(default_factory=list)

    @property
    def is_score_level(self) -> bool:
        return bool(self.members)

    @property
    def is_partitioned(self) -> bool:
        return bool(self.parts)


class PlanSource(Protocol):
    """Anything that can plan a condition: `defenses.Defense` and its subclasses."""

    name: str

    def plan(self, queries: list[Query], bundle) -> ScoringPlan: ...


# Set by the `defenses` package when it is imported, so that ``scorer.score(q, defense="name")``
# resolves names without the scorer importing a higher layer.
_resolver: Callable[[str], PlanSource] | None = None


def set_defense_resolver(fn: Callable[[str], PlanSource]) -> None:
    """Register the function that turns a defense name into a defense (done by `defenses`)."""
    global _resolver
    _resolver = fn


def has_defense_resolver() -> bool:
    """Whether defense names can be resolved (the `defenses` package has been imported)."""
    return _resolver is not None


def as_plan(defense, queries: list[Query], bundle) -> ScoringPlan:
    """A `ScoringPlan` from a plan, a defense object, or a defense name / ensemble expression."""
    if isinstance(defense, ScoringPlan):
        return defense
    if isinstance(defense, str):
        if _resolver is None:
            raise InputError(f"defense {defense!r} given by name, but no defense registry is loaded: "
                             "`import defenses` first, or pass a Defense object")
        defense = _resolver(defense)
    if not hasattr(defense, "plan"):
        raise InputError(f"defense must be a Defense, a ScoringPlan or a name, got {type(defense).__name__}")
    return defense.plan(list(queries), bundle)


def fold_variants(table: ScoreTable, groups: list[list[int]], rule: str):
    """One row per query from its variants' rows: margin [N], lens [N, L], hidden [N, L, d] or None."""
    margins, lenses, hiddens = [], [], []
    for rows in groups:
        idx = torch.tensor(rows)
        if len(rows) == 1:  # a single variant keeps its margin bit for bit
            margins.append(table.margin[idx][0].double())
            lenses.append(table.lens_margin[idx][0].double())
        else:
            margins.append(combine_margins(table.margin[idx], rule))
            lenses.append(combine_margins(table.lens_margin[idx], rule))
        if table.hidden is not None:
            hiddens.append(table.hidden[idx].mean(0))
    hidden = torch.stack(hiddens) if table.hidden is not None else None
    return torch.stack(margins).float(), torch.stack(lenses).float(), hidden


def run_plan(scorer, queries: Sequence[Query], plan: ScoringPlan, *, prompt=PromptSpec(), meta=None,
             desc: str = "scoring") -> ScoreTable:
    """Score ``queries`` as ``plan`` says; the table's rows follow the input order."""
    queries = list(queries)
    record = {"condition": plan.name, **plan.record, **(meta or {})}
    if plan.is_score_level:
        tables = [run_plan(scorer, queries, m, prompt=prompt, desc=desc) for m in plan.members]
        return combine_tables(tables, plan.combine, record)
    if plan.is_partitioned:
        return _run_parts(scorer, queries, plan, prompt, record, desc)
    bundle = plan.bundle if plan.bundle is not None else scorer.bundle
    active = scorer if bundle is scorer.bundle else scorer.with_bundle(bundle)
    flat, specs, groups = expand_variants(queries, plan, prompt)
    with edit(bundle, plan.edits, positions=plan.edit_positions):
        if active.share_prefix and not plan.edits and any(len(g) > 1 for g in groups):
            # K variants of an image query that differ only after the image (text noise, text
            # around the request): the image prefix runs once per query, not K times.
            table = score_variant_groups(active, flat, specs, groups, desc=f"{desc} [{plan.name}]")
        else:
            table = active.score(flat, prompt=specs, desc=f"{desc} [{plan.name}]")
    return fold_table(table, queries, groups, plan.aggregate, record)


def expand_variants(queries: list[Query], plan: ScoringPlan, prompt=PromptSpec()):
    """A plan's variant rows: ``flat`` queries (ids ``<id>#<k>`` when a query has several), their
    prompt specs (``prompt`` merged with each variant's), and each query's rows in ``flat``."""
    if len(plan.variants) != len(queries):
        raise ScoringError(f"defense {plan.name!r} returned variants for {len(plan.variants)} of {len(queries)} queries")
    base_specs = [prompt] * len(queries) if isinstance(prompt, PromptSpec) else list(prompt)
    flat, specs, groups = [], [], []
    for q, base, vs in zip(queries, base_specs, plan.variants):
        if not vs:
            raise ScoringError(f"defense {plan.name!r} returned no variant for query {q.id!r}")
        rows = []
        for k, (vq, spec) in enumerate(vs):
            rows.append(len(flat))
            flat.append(dataclasses.replace(vq, id=q.id if len(vs) == 1 else f"{q.id}#{k}"))
            specs.append(base.merged(spec))
        groups.append(rows)
    return flat, specs, groups


def fold_table(table: ScoreTable, queries: list[Query], groups: list[list[int]], rule: str, record: dict) -> ScoreTable:
    """One row per query from a table of variant rows (``groups[i]``: query i's rows), meta from
    the table and ``record``."""
    margin, lens, hidden = fold_variants(table, groups, rule)
    out_meta = {**table.meta, **record}
    if any(len(g) > 1 for g in groups):
        out_meta["samples"] = max(len(g) for g in groups)
    rows = [{**table.row_meta[g[0]], "variants": len(g)} for g in groups]
    return ScoreTable([q.id for q in queries], [q.label for q in queries], margin, lens, list(table.layers),
                      hidden, out_meta, rows)


def _run_parts(scorer, queries: list[Query], plan: ScoringPlan, prompt, record: dict, desc: str) -> ScoreTable:
    """Each part of a partitioned plan on its own queries; rows put back in input order."""
    order = [int(i) for idx, _ in plan.parts for i in idx]
    if sorted(order) != list(range(len(queries))):
        raise ScoringError(f"plan {plan.name!r}: its parts do not partition the {len(queries)} queries "
                           f"(every query exactly once)")
    specs = None if isinstance(prompt, PromptSpec) else list(prompt)
    pieces = []
    for idx, sub in plan.parts:
        if not idx:
            continue
        sub_prompt = prompt if specs is None else [specs[i] for i in idx]
        pieces.append(run_plan(scorer, [queries[i] for i in idx], sub, prompt=sub_prompt, desc=desc))
    table = ScoreTable.concat(pieces).select([q.id for q in queries])  # back to input order
    # concat keeps the first part's meta: drop what each part recorded about itself (its "fold" or
    # "folds"), which would claim every query for the first part; the partitioned plan's own
    # record (a cross-fitted defense's describe()) holds every query's fold
    for _, sub in plan.parts:
        for key in sub.record:
            if key not in record:
                table.meta.pop(key, None)
    table.meta.update(record)
    return table


def combine_tables(tables: list[ScoreTable], rule: str, meta: dict | None = None) -> ScoreTable:
    """Score-level ensemble of finished runs of the same queries (rows aligned to the first).

    Margins and lens margins are combined per query by ``rule``; hidden states are not (no rule
    turns members' states into an ensemble's), so the table has ``hidden=None`` whatever the
    members kept, and ``meta["score_level"]`` names the rule (`probing.analysis.layer_profile`
    says so when asked for a state-based profile)."""
    if len(tables) < 2:
        raise InputError("a score-level ensemble needs at least two member runs")
    first = tables[0]
    tables = [first] + [t.select(first.ids) for t in tables[1:]]
    margin = combine_margins(torch.stack([t.margin for t in tables]), rule).float()
    lens = combine_margins(torch.stack([t.lens_margin for t in tables]), rule).float()
    return ScoreTable(list(first.ids), list(first.labels), margin, lens, list(first.layers), None,
                      {**first.meta, **(meta or {}), "score_level": rule}, [dict(r) for r in first.row_meta])
