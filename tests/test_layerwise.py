"""Per-layer decomposition recovers planted layers, on all three per-layer scores."""

import numpy as np
import pytest
import torch

from probing import ScoreTable
from probing.analysis import diffmean_scores, layer_profile, stratified_folds
from probing.analysis import pair_tables

from .synthetic import make_baseline

PLANTED = 3


def planted_separation(base: ScoreTable, start=PLANTED, amount=2.0) -> ScoreTable:
    """Harmful queries move along the harm direction (and their lens margins up) from layer `start` on."""
    is_h = torch.tensor([lab == "harmful" for lab in base.labels])
    layer_on = torch.arange(len(base.layers)) >= start
    hid = base.hidden.clone()
    hid[:, :, 0] += amount * (is_h[:, None] & layer_on[None, :]).float()
    lens = base.lens_margin + amount * (is_h[:, None] & layer_on[None, :]).float()
    return ScoreTable(base.ids, base.labels, base.margin.clone(), lens, base.layers, hid, {"condition": "planted"})


@pytest.fixture(scope="module")
def runs():
    base = make_baseline(n_h=50, n_b=50, hidden=True)
    return base, planted_separation(base)


@pytest.mark.parametrize("score", ["lens", "diffmean", "probe"])
def test_planted_layer_is_recovered(runs, score):
    base, dfd = runs
    prof = layer_profile(base, dfd, score, n_boot=100, n_folds=5)
    assert prof.first_layer("differential_sd", min_effect=0.5) == PLANTED
    assert all(abs(prof.values["differential_sd"][i]) < 0.5 for i in range(PLANTED))
    assert all(prof.values["auroc_change"][i] > 0.1 for i in range(PLANTED, len(base.layers)))
    assert len(prof.rows()) == len(base.layers)


def test_diffmean_is_out_of_fold(runs):
    """A query's projection must not use its own activation: changing one query's hidden state
    leaves its own projection direction (fitted on other folds) unchanged."""
    base, _ = runs
    paired = pair_tables(base, base, "hidden")
    s0, _ = diffmean_scores(paired, n_folds=5, seed=0)
    folds = stratified_folds(paired.is_harmful, 5, 0, ids=paired.ids, groups=paired.groups)  # diffmean's folds
    bumped = paired.base.copy()
    bumped[0, :, 1:] += 10.0  # move query 0 away from the direction's support
    paired2 = type(paired)(paired.ids, paired.is_harmful, bumped, bumped)
    t0, _ = diffmean_scores(paired2, n_folds=5, seed=0)
    same_fold = folds == folds[0]
    # projections of other queries in query 0's fold are untouched (their direction excludes fold 0)
    np.testing.assert_allclose(t0[same_fold][1:], s0[same_fold][1:], atol=1e-9)


def test_pure_lens_shift_is_shift_at_every_layer(runs):
    base, _ = runs
    shifted = ScoreTable(base.ids, base.labels, base.margin + 1, base.lens_margin + 1, base.layers, base.hidden)
    prof = layer_profile(base, shifted, "lens", n_boot=50)
    assert (prof.values["shift_sd"] > 0.5).all()
    np.testing.assert_allclose(prof.values["auroc_change"], 0, atol=1e-12)


def test_layerwise_errors(runs):
    base, dfd = runs
    with pytest.raises(ValueError, match="keep_hidden"):
        no_hidden = ScoreTable(base.ids, base.labels, base.margin, base.lens_margin, base.layers)
        layer_profile(no_hidden, no_hidden, "probe")
    with pytest.raises(ValueError, match="score must be"):
        layer_profile(base, dfd, "vibes")
    with pytest.raises(ValueError, match="n_folds"):
        layer_profile(base, dfd, "diffmean", n_folds=1)
