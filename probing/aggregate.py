"""How several refusal margins of one query become one: the single place of each formula.

Used for the K variants of a multi-sample defense (noise injection), for score-level ensembles of
defenses ("a|b", "a&b", "a~b") and for ensembles predicted from single runs. Every rule returns a
margin on the scale of a single forward's margin (logit of p_refuse), exactly and unclamped, so a
rule applied to K identical margins returns that margin:

| rule | meaning | margin |
|---|---|---|
| ``max`` | refuse if any refuses (``a|b``) | max_k m_k  (sigmoid is monotone, so p = max_k p_k) |
| ``min`` | refuse only if all refuse (``a&b``) | min_k m_k |
| ``mean`` | mean p_refuse (``a~b``, NI "mean") | logit(mean_k sigmoid(m_k)) = LSE_k log sigmoid(m_k) - LSE_k log sigmoid(-m_k) |
| ``majority`` | majority vote of the variants (NI "majority") | median_k m_k (its sign is the vote; ties give the midpoint) |
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import InputError, ScoringError

RULES = ("max", "min", "mean", "majority")
# Score-level ensemble operators and the rule each one means.
OPERATORS = {"|": "max", "&": "min", "~": "mean"}


def combine_margins(margins: torch.Tensor, rule: str, dim: int = 0) -> torch.Tensor:
    """Combine margins along ``dim`` by ``rule`` (see the module table); float64 in, float64 out."""
    if rule not in RULES:
        raise InputError(f"rule must be one of {RULES}, got {rule!r}")
    m = margins.double()
    if torch.isnan(m).any():
        raise ScoringError(f"cannot combine NaN margins by {rule!r}: a forward produced NaN")
    if m.numel() == 0:  # e.g. lens margins of a scorer that captures no layer: [K, 0]
        return m.sum(dim)
    if rule == "max":
        return m.amax(dim)
    if rule == "min":
        return m.amin(dim)
    if rule == "mean":
        return torch.logsumexp(F.logsigmoid(m), dim) - torch.logsumexp(F.logsigmoid(-m), dim)
    return torch.quantile(m, 0.5, dim=dim)
