"""Output-level mechanism analysis against sklearn / scipy and planted effects."""

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score

from probing import ScoreTable
from probing.analysis import compare, mechanism_label
from probing.metrics import auroc, d_prime, percentile_ci, stratified_indices

from .synthetic import make_baseline, with_margins


def test_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    h = np.round(rng.normal(0.3, 1, 70), 1)  # rounding creates ties
    b = np.round(rng.normal(0, 1, 50), 1)
    want = roc_auc_score(np.r_[np.ones(70), np.zeros(50)], np.r_[h, b])
    assert auroc(h, b) == pytest.approx(want, abs=1e-12)
    # vectorised over resamples
    batch = auroc(np.stack([h, h[::-1]]), np.stack([b, b + 1]))
    assert batch[1] == pytest.approx(roc_auc_score(np.r_[np.ones(70), np.zeros(50)], np.r_[h[::-1], b + 1]))


def test_d_prime_by_hand_and_degenerate_values():
    h, b = np.array([1.0, 2.0, 3.0]), np.array([0.0, 0.5, 1.0, 1.5])
    want = (2.0 - 0.75) / np.sqrt((np.var(h, ddof=1) + np.var(b, ddof=1)) / 2)
    assert d_prime(h, b) == pytest.approx(want)
    assert d_prime(np.ones(3), np.ones(4)) == 0.0          # constant, equal means
    assert d_prime(np.ones(3) * 2, np.ones(4)) == np.inf    # constant, different means
    assert auroc(np.ones(3), np.ones(4)) == 0.5


def test_bootstrap_interval_matches_scipy():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, 400)
    ih, _ = stratified_indices(400, 2, 4000, seed=2)
    ours = percentile_ci(x[ih].mean(-1))
    ref = stats.bootstrap((x,), np.mean, n_resamples=4000, method="percentile", random_state=3).confidence_interval
    assert ours[0] == pytest.approx(ref.low, abs=0.015) and ours[1] == pytest.approx(ref.high, abs=0.015)
    assert ours[0] == pytest.approx(x.mean() - 1.96 * x.std() / 20, abs=0.02)


def test_pure_shift_is_safety_shift_with_auroc_unchanged():
    base = make_baseline()
    eff = compare(base, with_margins(base, 1.0, 1.0), n_boot=300)
    assert eff.label == "safety shift"
    assert eff["auroc_change"].value == pytest.approx(0, abs=1e-12)
    assert eff["dprime_change"].value == pytest.approx(0, abs=1e-6)
    assert eff["common_shift"].value == pytest.approx(1.0, abs=1e-6)
    assert eff["differential"].value == pytest.approx(0.0, abs=1e-6)
    assert eff["mean_shift"].value > 0


def test_pure_separation_is_discrimination():
    base = make_baseline()
    eff = compare(base, with_margins(base, 1.0, -1.0), n_boot=300)
    assert eff.label == "harmfulness discrimination"
    assert eff["common_shift"].value == pytest.approx(0.0, abs=1e-6)
    assert eff["differential"].value == pytest.approx(2.0, abs=1e-6)
    assert eff["auroc_change"].value > 0.1 and eff["auroc_change"].lo > 0


def test_both_neither_and_weakening():
    base = make_baseline()
    assert compare(base, with_margins(base, 2.0, 0.5), n_boot=300).label == "both"
    assert compare(base, with_margins(base, 0.0, 0.0, noise=0.01), n_boot=300).label == "neither"
    assert compare(base, with_margins(base, -1.0, -1.0), n_boot=300).label == "weakening"


def test_figures_by_hand():
    base = make_baseline(n_h=5, n_b=4, seed=3)
    dfd = with_margins(base, 0.7, -0.2, noise=0.3)
    eff = compare(base, dfd, n_boot=50)
    sig = lambda t: torch.sigmoid(t).numpy()
    lab = np.array(base.labels)
    p0, p1, m0, m1 = sig(base.margin), sig(dfd.margin), base.margin.numpy(), dfd.margin.numpy()
    h, b = lab == "harmful", lab == "benign"
    assert eff["refusal_harmful_def"].value == pytest.approx((p1[h] > 0.5).mean())
    assert eff["refusal_benign_base"].value == pytest.approx((p0[b] > 0.5).mean())
    assert eff["mean_shift"].value == pytest.approx(((p1[h].mean() + p1[b].mean()) - (p0[h].mean() + p0[b].mean())) / 2)
    assert eff["distance_change"].value == pytest.approx((p1[h].mean() - p1[b].mean()) - (p0[h].mean() - p0[b].mean()))
    assert eff["auroc_def"].value == pytest.approx(roc_auc_score(h, m1))
    dec = eff.decomposition
    np.testing.assert_allclose(dec["common"] + dec["differential"] + dec["residual"], dec["delta"], atol=1e-9)
    for part in (h, b):  # residuals average to zero within each class
        assert abs(dec["residual"][part].mean()) < 1e-6
    ci = eff["common_shift"]
    assert ci.lo <= ci.value <= ci.hi


def test_pairing_by_id_ignores_order():
    base = make_baseline()
    dfd = with_margins(base, 1.0, -1.0)
    shuffled = dfd.select(list(reversed(dfd.ids)))
    a, b = compare(base, dfd, n_boot=100), compare(base, shuffled, n_boot=100)
    assert a["differential"].value == pytest.approx(b["differential"].value)
    assert a["differential"].lo == pytest.approx(b["differential"].lo)


def test_degenerate_inputs():
    base = make_baseline(n_h=6, n_b=6)
    with pytest.raises(ValueError, match="only in the baseline"):
        compare(base, with_margins(base, 1, 1).select(base.ids[:-1]))
    one_class = base.select([i for i, lab in zip(base.ids, base.labels) if lab == "harmful"])
    with pytest.raises(ValueError, match="at least 2 harmful and 2 benign"):
        compare(one_class, one_class)
    few = base.select(base.ids[:6] + base.ids[6:7])
    with pytest.raises(ValueError, match="got 6 harmful and 1 benign"):
        compare(few, few)
    nan = with_margins(base, 0.0, 0.0)
    nan.margin[3] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite margin in the defended run for queries \['q3'\]"):
        compare(base, nan)
    unl = ScoreTable(base.ids, [None] * 12, base.margin, base.lens_margin, base.layers)
    with pytest.raises(ValueError, match="unlabeled"):
        compare(unl, unl)
    const = ScoreTable(base.ids, base.labels, torch.zeros(12), base.lens_margin, base.layers)
    eff = compare(const, const, n_boot=20)  # documented values, no crash
    assert eff["auroc_base"].value == 0.5 and eff["dprime_base"].value == 0.0 and eff.label == "neither"


def test_label_rule_uses_interval_and_minimum_effect():
    from probing.analysis import Estimate

    def est(shift, diff, harm):
        return {"shift_sd": Estimate(*shift), "differential_sd": Estimate(*diff), "harmful_change_sd": Estimate(*harm)}

    assert mechanism_label(est((0.5, 0.2, 0.8), (0, -0.1, 0.1), (0.5, 0.2, 0.8))) == "safety shift"
    assert mechanism_label(est((0.05, 0.01, 0.09), (0, -0.1, 0.1), (0.05, 0.01, 0.09))) == "neither"  # tiny
    assert mechanism_label(est((0.5, -0.1, 1.0), (0, -0.1, 0.1), (0.5, -0.1, 1))) == "neither"  # CI spans 0
