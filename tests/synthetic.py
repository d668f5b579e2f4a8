"""Synthetic ScoreTables with planted effects (no model needed), and small helpers the tests share."""

import numpy as np
import torch

from probing import ScoreTable


def make_baseline(n_h=60, n_b=60, n_layers=6, d=16, seed=0, hidden=False, sep=1.0):
    rng = np.random.default_rng(seed)
    labels = ["harmful"] * n_h + ["benign"] * n_b
    is_h = np.array([lab == "harmful" for lab in labels])
    margin = rng.normal(0, 1, n_h + n_b) + np.where(is_h, sep / 2, -sep / 2)
    lens = rng.normal(0, 1, (n_h + n_b, n_layers)) + np.where(is_h, sep / 2, -sep / 2)[:, None]
    hid = None
    if hidden:
        u = np.zeros(d)
        u[0] = 1.0
        hid = rng.normal(0, 1, (n_h + n_b, n_layers, d)) + (np.where(is_h, 0.6, -0.6)[:, None, None] * u)
        hid = torch.tensor(hid, dtype=torch.float32)
    ids = [f"q{i}" for i in range(n_h + n_b)]
    return ScoreTable(ids, labels, torch.tensor(margin, dtype=torch.float32),
                      torch.tensor(lens, dtype=torch.float32), list(range(n_layers)), hid,
                      {"condition": "baseline"})


def with_margins(base: ScoreTable, harmful_delta, benign_delta, name="defended", noise=0.0, seed=1):
    rng = np.random.default_rng(seed)
    is_h = np.array([lab == "harmful" for lab in base.labels])
    delta = np.where(is_h, harmful_delta, benign_delta) + rng.normal(0, noise, len(base)) * (noise > 0)
    d = torch.tensor(delta, dtype=torch.float32)
    return ScoreTable(list(base.ids), list(base.labels), base.margin + d, base.lens_margin + d[:, None],
                      list(base.layers), base.hidden, {"condition": name})


def lm_tokens(kwargs: dict) -> int:
    """Rows x positions one language-model forward received (a pre-hook's kwargs): embedded
    positions for image rows, token ids for text-only rows (the scorer passes those directly)."""
    x = kwargs.get("inputs_embeds")
    if x is None:
        x = kwargs["input_ids"]
    return int(x.shape[0] * x.shape[1])
