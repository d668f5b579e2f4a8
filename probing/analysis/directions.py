"""Refusal directions: where harmful and benign decision states differ, per layer.

    r_l = mean_harmful(h_l) - mean_benign(h_l)          [d_model], accumulated in float64

Read from a ScoreTable scored with ``keep_hidden=True`` (``blocks.{l}.hook_resid_post`` at the
decision position). Activation-level defenses (defenses/activation.py) build on these.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ..score_table import ScoreTable


def refusal_directions(table: ScoreTable, rows=None) -> dict[int, torch.Tensor]:
    """Difference-of-means direction per captured layer: ``{layer: [d_model]}`` (float32).

    ``rows`` (indices) restricts the estimate to some queries, e.g. the other folds when
    cross-fitting."""
    if table.hidden is None:
        raise InputError("the direction table needs hidden states: score the baseline with keep_hidden=True")
    rows = list(range(len(table))) if rows is None else list(rows)
    labels = [table.labels[i] for i in rows]
    h = torch.tensor([lab == "harmful" for lab in labels], dtype=torch.bool)
    b = torch.tensor([lab == "benign" for lab in labels], dtype=torch.bool)
    if h.sum() < 1 or b.sum() < 1:
        raise InputError("the direction table needs harmful and benign queries")
    hidden = table.hidden[torch.tensor(rows, dtype=torch.long)].double()
    diff = hidden[h].mean(0) - hidden[b].mean(0)  # [L, d]
    return {layer: diff[i].float() for i, layer in enumerate(table.layers)}
