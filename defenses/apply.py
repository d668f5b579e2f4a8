"""Applying a defense while scoring: transforms, model swap, activation edits, aggregation."""

from __future__ import annotations

import logging

import torch

from hooks import edit
from probing.render import PromptSpec
from probing.score_table import ScoreTable

from .base import Defense

logger = logging.getLogger(__name__)
_EPS = 1e-6


def _logit(p: torch.Tensor) -> torch.Tensor:
    return torch.logit(p.double().clamp(_EPS, 1 - _EPS)).float()


def aggregate(table: ScoreTable, groups: list[list[int]], how: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Fold K variant rows back to one row per query: margin [N], lens [N, L], hidden [N, L, d]."""
    margins, lenses, hiddens = [], [], []
    for rows in groups:
        idx = torch.tensor(rows)
        if len(rows) == 1:
            margins.append(table.margin[idx][0])
            lenses.append(table.lens_margin[idx][0])
        elif how == "mean":
            margins.append(_logit(torch.sigmoid(table.margin[idx].double()).mean()))
            lenses.append(_logit(torch.sigmoid(table.lens_margin[idx].double()).mean(0)))
        elif how == "majority":
            margins.append(_logit((table.margin[idx] > 0).double().mean()))
            lenses.append(_logit((table.lens_margin[idx] > 0).double().mean(0)))
        else:
            raise ValueError(f"aggregate must be 'mean' or 'majority', got {how!r}")
        if table.hidden is not None:
            hiddens.append(table.hidden[idx].mean(0))
    hidden = torch.stack(hiddens) if table.hidden is not None else None
    return torch.stack(margins).float(), torch.stack(lenses).float(), hidden


def score_defended(scorer, queries, defense, *, prompt=PromptSpec(), meta=None, desc="scoring") -> ScoreTable:
    """Score ``queries`` under ``defense`` (an object or a registry name / ensemble expression)."""
    from .registry import get_defense

    if isinstance(defense, str):
        defense = get_defense(defense)
    if not isinstance(defense, Defense):
        raise TypeError(f"defense must be a Defense or a name, got {type(defense).__name__}")
    record = {"condition": defense.name, **defense.describe(), **(meta or {})}
    if hasattr(defense, "score_with"):  # score-level ensembles combine their members' tables
        table = defense.score_with(scorer, queries, prompt=prompt, desc=desc)
        table.meta.update(record)
        return table
    base_specs = [prompt] * len(queries) if isinstance(prompt, PromptSpec) else list(prompt)
    bundle = defense.model(scorer.bundle)
    active = scorer if bundle is scorer.bundle else scorer.with_bundle(bundle)
    variants = defense.transform(queries, bundle)
    if len(variants) != len(queries):
        raise RuntimeError(f"defense {defense.name!r} returned variants for {len(variants)} of {len(queries)} queries")
    flat, specs, groups = [], [], []
    for q, base, vs in zip(queries, base_specs, variants):
        if not vs:
            raise RuntimeError(f"defense {defense.name!r} returned no variant for query {q.id!r}")
        rows = []
        for k, (vq, spec) in enumerate(vs):
            vq.id = q.id if len(vs) == 1 else f"{q.id}#{k}"
            rows.append(len(flat))
            flat.append(vq)
            specs.append(base.merged(spec))
        groups.append(rows)
    with edit(bundle, defense.edits(bundle), positions=defense.edit_positions):
        table = active.score(flat, prompt=specs, desc=f"{desc} [{defense.name}]")
    margin, lens, hidden = aggregate(table, groups, defense.aggregate)
    out_meta = {**table.meta, **record}
    if any(len(g) > 1 for g in groups):
        out_meta["samples"] = max(len(g) for g in groups)
    return ScoreTable([q.id for q in queries], [q.label for q in queries], margin, lens, list(table.layers),
                      hidden, out_meta)
