"""Ensemble prediction formulas, ranking, Pareto front, predicted-vs-measured, plots."""

import numpy as np
import pytest
import torch

from probing.ensembles import evaluate_prediction, pareto_mask, predict, rank_ensembles, safety_helpfulness
from experiments.plots import plot_distributions, plot_layer_profiles, plot_tradeoff
from probing.layerwise import layer_profile

from .synthetic import make_baseline, with_margins


@pytest.fixture(scope="module")
def runs():
    base = make_baseline(n_h=40, n_b=40, seed=4)
    return base, {"shift": with_margins(base, 1.5, 1.5, "shift", noise=0.2, seed=5),
                  "disc": with_margins(base, 1.0, -1.0, "disc", noise=0.2, seed=6)}


def test_compose_adds_deltas_in_logit_space(runs):
    base, singles = runs
    pred = predict(base, singles, "+")
    want = singles["shift"].margin + singles["disc"].margin - base.margin
    torch.testing.assert_close(pred.margin, want)
    assert pred.meta["condition"] == "shift+disc"


def test_either_is_max_p_refuse_and_others(runs):
    base, singles = runs
    p = torch.stack([singles["shift"].p_refuse, singles["disc"].p_refuse])
    torch.testing.assert_close(predict(base, singles, "|").p_refuse, p.max(0).values, atol=1e-6, rtol=0)
    torch.testing.assert_close(predict(base, singles, "&").p_refuse, p.min(0).values, atol=1e-6, rtol=0)
    torch.testing.assert_close(predict(base, singles, "~").p_refuse, p.mean(0), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="op must be"):
        predict(base, singles, "*")


def test_prediction_error_against_measured(runs):
    base, singles = runs
    pred = predict(base, singles, "+")
    assert evaluate_prediction(pred, pred)["margin_rmse"] == 0
    off = with_margins(pred, 0.5, 0.5)
    ev = evaluate_prediction(pred, off)
    assert ev["margin_rmse"] == pytest.approx(0.5, abs=1e-6)


def test_pareto_mask_brute_force():
    rng = np.random.default_rng(0)
    pts = rng.random((30, 2))
    mask = pareto_mask(pts)
    for i, p in enumerate(pts):
        dominated = any((q >= p).all() and (q > p).any() for q in pts)
        assert mask[i] == (not dominated)


def test_rank_ensembles(runs, tmp_path):
    base, singles = runs
    measured = {"shift+disc": with_margins(predict(base, singles, "+"), 0.2, 0.2, "m")}
    cands = rank_ensembles(base, singles, weight=0.5, measured=measured)
    names = {c.name for c in cands}
    assert names == {"baseline", "shift", "disc", "shift+disc", "shift|disc"}
    assert [c.utility for c in cands] == sorted((c.utility for c in cands), reverse=True)
    c = next(c for c in cands if c.name == "shift+disc")
    s, h = safety_helpfulness(predict(base, singles, "+"))
    assert (c.safety, c.helpfulness) == (s, h)
    assert c.margin_rmse == pytest.approx(0.2, abs=1e-5) and c.measured_safety is not None
    assert any(c.pareto for c in cands)
    out = plot_tradeoff(cands, tmp_path / "tradeoff.png")
    assert out.stat().st_size > 10_000


def test_plots_are_written(runs, tmp_path):
    base, singles = runs
    p = plot_distributions({"baseline": base, **singles}, tmp_path / "dist.png")
    assert p.stat().st_size > 10_000
    profs = [layer_profile(base, t, "lens", n_boot=20) for t in singles.values()]
    assert plot_layer_profiles(profs, tmp_path / "layers.png").stat().st_size > 10_000
