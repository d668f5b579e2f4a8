"""Ensembles: exact score-level combinations, "+" predictions and their errors, ranking by measured
values, Pareto front, plots."""

import numpy as np
import pytest
import torch

from probing.analysis import (combine, evaluate_prediction, fit_compose, pareto_mask, predict, rank_ensembles,
                              safety_helpfulness)
from probing.aggregate import combine_margins
from experiments.plots import plot_distributions, plot_layer_profiles, plot_tradeoff
from probing.analysis import layer_profile

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
    assert pred.meta["condition"] == "shift+disc" and pred.meta["source"] == "predicted"


def test_score_level_ensembles_are_exact_combinations(runs):
    base, singles = runs
    p = torch.stack([singles["shift"].p_refuse.double(), singles["disc"].p_refuse.double()])
    either, both, mean = (combine(base, singles, op) for op in "|&~")
    torch.testing.assert_close(either.p_refuse.double(), p.max(0).values, atol=1e-6, rtol=0)
    torch.testing.assert_close(both.p_refuse.double(), p.min(0).values, atol=1e-6, rtol=0)
    torch.testing.assert_close(mean.p_refuse.double(), p.mean(0), atol=1e-6, rtol=0)
    # the one formula of probing/aggregate.py, unclamped (huge margins survive)
    m = torch.stack([singles["shift"].margin, singles["disc"].margin])
    torch.testing.assert_close(mean.margin, combine_margins(m, "mean").float())
    assert either.meta["source"] == "exact" and predict(base, singles, "|").meta["source"] == "exact"
    with pytest.raises(ValueError, match="op must be"):
        predict(base, singles, "*")


def test_prediction_error_against_measured(runs):
    base, singles = runs
    pred = predict(base, singles, "+")
    assert evaluate_prediction(pred, pred)["margin_rmse"] == 0
    off = with_margins(pred, 0.5, 0.5)
    ev = evaluate_prediction(pred, off)
    assert ev["margin_rmse"] == pytest.approx(0.5, abs=1e-6)


def test_calibrated_compose_recovers_a_planted_interaction():
    """Three singles; every measured pair follows delta_ab = 0.7 (da + db) - 0.1 da db. Fitted
    leave-one-pair-out, the calibrated model predicts the held-out pair; additivity does not."""
    base = make_baseline(n_h=30, n_b=30, seed=8)
    rng = np.random.default_rng(3)
    singles = {n: with_margins(base, rng.normal(1, 0.5), rng.normal(0.3, 0.5), n, noise=0.6, seed=i)
               for i, n in enumerate("abc")}
    m0 = base.margin.double()
    measured = {}
    for a, b in (("a", "b"), ("a", "c"), ("b", "c")):
        da, db = singles[a].margin.double() - m0, singles[b].margin.double() - m0
        t = with_margins(base, 0, 0, f"{a}+{b}")
        t.margin = (m0 + 0.7 * (da + db) - 0.1 * da * db).float()
        measured[f"{a}+{b}"] = t
    model = fit_compose(base, singles, measured, exclude=("a", "b"))
    assert model.n_pairs == 2
    assert model.slope == pytest.approx(0.7, abs=1e-4) and model.interaction == pytest.approx(-0.1, abs=1e-4)
    cal = predict(base, {"a": singles["a"], "b": singles["b"]}, "+", model=model)
    add = predict(base, {"a": singles["a"], "b": singles["b"]}, "+")
    assert evaluate_prediction(cal, measured["a+b"])["margin_rmse"] < 1e-4
    assert evaluate_prediction(add, measured["a+b"])["margin_rmse"] > 0.3
    assert fit_compose(base, singles, {}).slope == 1.0  # nothing measured: additivity


def test_pareto_mask_brute_force():
    rng = np.random.default_rng(0)
    pts = rng.random((30, 2))
    mask = pareto_mask(pts)
    for i, p in enumerate(pts):
        dominated = any((q >= p).all() and (q > p).any() for q in pts)
        assert mask[i] == (not dominated)


def test_rank_ensembles_uses_measured_values(runs, tmp_path):
    base, singles = runs
    measured_plus = with_margins(predict(base, singles, "+"), -2.0, -2.0, "m")  # far from the prediction
    cands = rank_ensembles(base, singles, weight=0.5, measured={"shift+disc": measured_plus})
    by = {c.name: c for c in cands}
    assert set(by) == {"baseline", "shift", "disc", "shift+disc", "shift|disc"}
    assert [c.utility for c in cands] == sorted((c.utility for c in cands), reverse=True)
    c = by["shift+disc"]
    # ranked by the measurement, the prediction kept beside it with its error
    assert c.source == "measured" and (c.safety, c.helpfulness) == safety_helpfulness(measured_plus)
    assert (c.predicted_safety, c.predicted_helpfulness) == safety_helpfulness(predict(base, singles, "+"))
    assert c.safety_error == pytest.approx(c.predicted_safety - c.safety)
    assert c.margin_rmse == pytest.approx(2.0, abs=1e-5)
    e = by["shift|disc"]  # not run, but exact from its members
    assert e.source == "exact" and (e.safety, e.helpfulness) == safety_helpfulness(combine(base, singles, "|"))
    assert e.measured_safety is None and e.safety_error is None
    assert by["baseline"].source == "measured" and by["shift"].source == "measured"
    front = {c.name for c in cands if c.pareto}
    pts = np.array([[c.safety, c.helpfulness] for c in cands])
    assert front == {c.name for c, f in zip(cands, pareto_mask(pts)) if f}
    unmeasured = {c.name: c for c in rank_ensembles(base, singles)}
    assert unmeasured["shift+disc"].source == "predicted"
    out = plot_tradeoff(cands, tmp_path / "tradeoff.png")
    assert out.stat().st_size > 10_000


def test_rank_ensembles_finds_a_measured_pair_keyed_in_the_other_order(runs):
    """A measured "disc|shift" is the pair shift|disc; a measured "disc+shift" is ranked by its
    measurement too, but under its own name ("+" depends on the order)."""
    base, singles = runs  # singles list "shift" before "disc"
    plus = with_margins(predict(base, singles, "+"), -2.0, -2.0, "disc+shift")  # far from the prediction
    either = with_margins(combine(base, singles, "|"), -3.0, 1.0, "disc|shift")  # differs from the exact one
    assert safety_helpfulness(plus) != safety_helpfulness(predict(base, singles, "+"))
    assert safety_helpfulness(either) != safety_helpfulness(combine(base, singles, "|"))
    by = {c.name: c for c in rank_ensembles(base, singles, measured={"disc+shift": plus, "disc|shift": either})}
    # "|" is one pair in either order; "+" is not (Compose applies its members in order): the
    # measured "disc+shift" is ranked under its own name, and no "shift+disc" is claimed measured
    assert "shift+disc" not in by
    for name, key, table in (("disc+shift", "disc+shift", plus), ("shift|disc", "disc|shift", either)):
        c = by[name]
        assert c.source == "measured" and c.measured_key == key, (name, c.source)
        assert (c.safety, c.helpfulness) == (c.measured_safety, c.measured_helpfulness) == safety_helpfulness(table)
    assert by["disc+shift"].margin_rmse == pytest.approx(2.0, abs=1e-5)
    assert by["disc+shift"].utility == pytest.approx(0.5 * sum(safety_helpfulness(plus)))
    # both orders measured: two candidates, each ranked by its own run; unmeasured pairs carry no key
    both = {c.name: c for c in rank_ensembles(base, singles, measured={"disc+shift": plus, "shift+disc": base})}
    assert both["shift+disc"].measured_key == "shift+disc" and both["disc+shift"].measured_key == "disc+shift"
    assert (both["shift+disc"].safety, both["shift+disc"].helpfulness) == safety_helpfulness(base)
    assert both["shift|disc"].measured_key is None
    # "~" is treated as commutative because it is, bit for bit, for two members
    a, b = singles["shift"], with_margins(singles["disc"], 9.0, -7.0, noise=2.0)
    for op in "|&~":
        ab, ba = combine(base, {"a": a, "b": b}, op), combine(base, {"b": b, "a": a}, op)
        assert torch.equal(ab.margin, ba.margin) and torch.equal(ab.lens_margin, ba.lens_margin), op


def test_plots_are_written(runs, tmp_path):
    base, singles = runs
    p = plot_distributions({"baseline": base, **singles}, tmp_path / "dist.png")
    assert p.stat().st_size > 10_000
    profs = [layer_profile(base, t, "lens", n_boot=20) for t in singles.values()]
    assert plot_layer_profiles(profs, tmp_path / "layers.png").stat().st_size > 10_000


def test_study_tradeoff_points_show_each_condition_once(runs, tmp_path):
    """The study report's trade-off points (`experiments.study.tradeoff_points`): every run once,
    filled, at its measurement; a run "+" pair's prediction beside it, at the prediction, marked
    superseded and left out of both fronts; a run "|" pair without a predicted twin (it is its own
    exact combination); a pair not run as a prediction. Fronts checked by brute force."""
    from experiments.plots import plot_tradeoff_points
    from experiments.study import tradeoff_points, tradeoff_rows

    base, singles = runs
    predicted_plus = predict(base, singles, "+")
    measured = {"shift+disc": with_margins(predicted_plus, -2.0, -2.0, "m"),  # far from its prediction
                "shift|disc": combine(base, singles, "|")}
    cands = rank_ensembles(base, singles, ops=("+", "|", "&"), weight=0.3, measured=measured)
    points = tradeoff_points(tradeoff_rows(cands, {k: k for k in measured}), 0.3)

    runs_ = [p for p in points if p["measured"]]
    assert sorted(p["name"] for p in runs_) == sorted(["baseline", "shift", "disc", "shift+disc", "shift|disc"])
    at = {p["name"]: (p["safety"], p["helpfulness"]) for p in runs_}
    for name, table in {"baseline": base, **singles, **measured}.items():
        assert at[name] == safety_helpfulness(table)
    guesses = {p["name"]: p for p in points if not p["measured"]}
    assert set(guesses) == {"shift+disc", "shift&disc"}
    plus = guesses["shift+disc"]
    assert plus["superseded"] and (plus["safety"], plus["helpfulness"]) == safety_helpfulness(predicted_plus)
    assert (plus["safety"], plus["helpfulness"]) != at["shift+disc"]  # the planted prediction error shows
    assert plus["pareto_measured"] is None and plus["pareto_all"] is None
    both = guesses["shift&disc"]
    assert not both["superseded"]
    assert (both["safety"], both["helpfulness"]) == safety_helpfulness(combine(base, singles, "&"))

    def front(sel):
        return {id(p) for p in sel if not any(q["safety"] >= p["safety"] and q["helpfulness"] >= p["helpfulness"]
                                              and (q["safety"], q["helpfulness"]) != (p["safety"], p["helpfulness"])
                                              for q in sel)}

    for group, sel in (("measured", runs_), ("all", [p for p in points if not p["superseded"]])):
        assert {id(p) for p in sel if p[f"pareto_{group}"]} == front(sel)
    for p in points:
        assert p["utility"] == pytest.approx(0.3 * p["safety"] + 0.7 * p["helpfulness"])
    assert plot_tradeoff_points(points, tmp_path / "tradeoff.png").stat().st_size > 10_000


def test_trade_off_labels_do_not_cover_each_other(tmp_path):
    """`place_labels`: labels of crowded points (a row of points at one safety, as on the toy,
    where many defenses refuse every harmful query) end up apart, off the other points' markers and
    inside the axes, each tied to its point; read back from the drawn figure."""
    import matplotlib.pyplot as plt
    from matplotlib.text import Annotation

    from experiments.plots import place_labels

    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    spots = [(0.60 + 0.03 * i, 1.0, f"defense_number_{i}, another_name") for i in range(8)]
    spots += [(0.9, 0.45 + 0.02 * i, f"low_{i}") for i in range(4)]
    place_labels(ax, spots)
    fig.canvas.draw()
    notes = [a for a in ax.texts if isinstance(a, Annotation)]
    assert sorted(a.get_text() for a in notes) == sorted(t for _, _, t in spots)
    renderer = fig.canvas.get_renderer()
    from matplotlib.text import Text

    boxes = [Text.get_window_extent(a, renderer) for a in notes]
    frame = ax.get_window_extent(renderer)
    for i, a in enumerate(boxes):
        assert frame.x0 <= a.x0 and a.x1 <= frame.x1 and frame.y0 <= a.y0 and a.y1 <= frame.y1, notes[i].get_text()
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (notes[i].get_text(), "overlaps another label")
        for x, y, text in spots:  # nor another point's marker (a 10 pt box around it)
            px, py = ax.transData.transform((x, y))
            r = 5.0 * fig.dpi / 72
            if text != notes[i].get_text():
                assert not (a.x0 < px + r and px - r < a.x1 and a.y0 < py + r and py - r < a.y1), \
                    (notes[i].get_text(), "covers the marker of", text)
    for a, (x, y, _) in zip(sorted(notes, key=lambda n: n.get_text()), sorted(spots, key=lambda t: t[2])):
        assert a.xy == (x, y)  # each label still points at its own point
    plt.close(fig)


def test_report_lists_runs_once_and_groups_predicted_pairs():
    """The study report's trade-off section: runs (and superseded predictions) in one table; the
    pairs not run, only those on the front with predictions, same rates in one row, best first."""
    from experiments.report import PREDICTED_ROWS, predicted_pair_blocks

    def point(name, s, h, measured=False, superseded=False, front=False):
        return {"name": name, "kind": "+", "measured": measured, "superseded": superseded, "safety": s,
                "helpfulness": h, "utility": 0.5 * s + 0.5 * h, "pareto_all": front}

    points = [point("a", 1.0, 0.9, measured=True, front=True)]
    points += [point(f"p{i}", 1.0, 0.9, front=True) for i in range(9)]  # nine pairs, the same prediction
    points += [point("q", 0.8, 1.0, front=True), point("r", 0.2, 0.2), point("s", 1.0, 0.9, superseded=True)]
    blocks = predicted_pair_blocks(points)
    assert blocks[0][0] == "text" and blocks[0][1].startswith("11 pairs were not run") and "10 of them reach " in blocks[0][1]
    rows = blocks[1][1]
    assert [r["n"] for r in rows] == [9, 1] and rows[0]["pairs"].endswith("+3 more") and rows[1]["pairs"] == "q"
    assert rows[0]["utility"] >= rows[1]["utility"]
    many = [point(f"x{i}", 1.0 - i / 100, 0.5 + i / 100, front=True) for i in range(PREDICTED_ROWS + 5)]
    assert len(predicted_pair_blocks(many)[1][1]) == PREDICTED_ROWS
    alone = predicted_pair_blocks([point("r", 0.2, 0.2)])[0][1]
    assert alone.startswith("1 pair was not run; its prediction is") and "It does not reach" in alone
    assert "None of them" in predicted_pair_blocks([point("r", 0.2, 0.2), point("t", 0.1, 0.1)])[0][1]
    assert "1 of them reaches " in predicted_pair_blocks([point("q", 0.8, 1.0, front=True), point("r", 0.2, 0.2)])[0][1]
    assert predicted_pair_blocks([point("a", 1.0, 0.9, measured=True)]) == []


def test_paper_comparison_says_when_sr_mo_only_ties_for_safest():
    """"SR+MO is the safest" is shown only when no other condition refuses as much harmful."""
    from experiments.report import paper_comparison

    def rows(srmo, others):
        out = [{"condition": "baseline", "label": "baseline", "refusal_harmful": 0.5},
               {"condition": "sr_a+mo_b", "label": "both", "refusal_harmful": srmo}]
        return out + [{"condition": f"sr_{i}", "label": "safety shift", "refusal_harmful": r}
                      for i, r in enumerate(others)]

    def verdict(summary):
        return next(r for r in paper_comparison(summary, {"points": []}) if r["finding"] == "SR+MO is the safest")

    assert verdict(rows(1.0, [0.9, 0.8]))["agrees"] == "yes"
    tied = verdict(rows(1.0, [1.0, 1.0, 0.8]))
    assert tied["agrees"] == "tied" and "reached by 2 other conditions too" in tied["toy"]
    assert verdict(rows(0.9, [1.0]))["agrees"] == "no"

    def best(points):
        summary = rows(1.0, [0.9]) + [{"condition": "qr_a|sr_b", "label": "both", "refusal_harmful": 1.0}]
        return next(r for r in paper_comparison(summary, {"points": points})
                    if r["finding"] == "QR|SR gives the best trade-off")

    def point(name, utility):
        return {"name": name, "measured": True, "utility": utility}

    assert best([point("qr_a|sr_b", 0.9), point("sr_a", 0.8)])["agrees"] == "yes"
    tie = best([point("qr_a", 0.9), point("qr_a|sr_b", 0.9), point("sr_a", 0.8)])
    assert tie["agrees"] == "tied" and "qr_a, qr_a|sr_b" in tie["toy"]
    assert best([point("qr_a", 0.9), point("qr_a|sr_b", 0.8)])["agrees"] == "no"


def test_trade_off_title_says_when_the_best_is_tied():
    from experiments.report import best_title

    def point(name, u, measured=True, superseded=False):
        return {"name": name, "utility": u, "measured": measured, "superseded": superseded}

    assert best_title([point("a", 0.9), point("b", 0.8)], 0.5) == " (best at weight 0.5: a, measured)"
    tied = best_title([point("p", 0.9, measured=False), point("a", 0.9), point("s", 0.95, False, True)], 0.5)
    assert tied == " (best at weight 0.5: a, measured; 1 more tied)"
    assert best_title([], 0.5) == ""


def test_thresholds_do_not_saturate_at_large_margins():
    """Margins of 20-45 logits: p_refuse is 1.0 in float32 above ~17 and in float64 above ~37, so
    rates and the fitted threshold are applied on the margin scale. Reference: numpy brute force on
    float64 margins with scipy's logit."""
    from scipy.special import logit

    from probing import ScoreTable
    from probing.analysis import compare

    rng = np.random.default_rng(7)
    h, b = rng.uniform(37.0, 45.0, 25), rng.uniform(30.0, 39.0, 25)  # overlapping near 38
    labels = ["harmful"] * 25 + ["benign"] * 25
    ids = [f"q{i}" for i in range(50)]
    m = torch.tensor(np.r_[h, b], dtype=torch.float32)
    base = ScoreTable(ids, labels, m, m[:, None].clone(), [0], None, {"condition": "baseline"})
    mh, mb = m[:25].double().numpy(), m[25:].double().numpy()
    # Youden's J by brute force over every midpoint of the sorted margins (and both ends)
    u = np.unique(np.r_[mh, mb])
    cuts = np.r_[u[0] - 1, (u[1:] + u[:-1]) / 2, u[-1] + 1]
    j = [(mh > c).mean() - (mb > c).mean() for c in cuts]
    cut = cuts[int(np.argmax(j))]
    assert cut > 37  # p = sigmoid(cut) is 1.0 in float64
    want = ((mh > cut).mean(), (mb <= cut).mean())
    assert want[0] > 0.5 and want[1] > 0.5
    assert safety_helpfulness(base, "fitted") == want
    eff = compare(base, with_margins(base, 0.0, 0.0, noise=0.1), n_boot=50, threshold="fitted")
    assert eff["refusal_harmful_base"].value == want[0] and 1 - eff["refusal_benign_base"].value == want[1]
    # the fitted threshold of the baseline applied to every candidate (it raised: "must lie in (0, 1)")
    singles = {"a": with_margins(base, -5.0, -5.0, "a"), "b": with_margins(base, 2.0, 0.0, "b")}
    by = {c.name: c for c in rank_ensembles(base, singles, threshold="fitted")}
    assert (by["baseline"].safety, by["baseline"].helpfulness) == want
    ma = singles["a"].margin.double().numpy()
    assert by["a"].safety == (ma[:25] > cut).mean() and by["a"].helpfulness == (ma[25:] <= cut).mean()
    # a float threshold near 1: margins 15-22 straddle logit(t) = 18.25; float32 p_refuse is 1.0 above ~17
    t = 1 / (1 + np.exp(-18.25))
    m2 = torch.tensor(np.r_[rng.uniform(15, 22, 20), rng.uniform(15, 22, 20)], dtype=torch.float32)
    t2 = ScoreTable(ids[:40], labels[:20] + labels[25:45], m2, m2[:, None].clone(), [0])
    x = m2.double().numpy()
    want2 = ((x[:20] > logit(t)).mean(), (x[20:] <= logit(t)).mean())
    assert safety_helpfulness(t2, t) == want2 and 0 < want2[1] < 1
    e2 = compare(t2, t2, n_boot=20, threshold=t)
    assert e2["refusal_benign_base"].value == pytest.approx(1 - want2[1], abs=1e-12)
    # the fitted threshold is reported as p (1.0 here) and, without loss, as the margin cut
    from probing.analysis import fitted_cut, fitted_threshold

    assert fitted_cut(base) == cut and fitted_threshold(base) == 1.0
    assert eff.config["threshold"] == 1.0 and eff.config["threshold_margin"] == cut
    assert eff.row()["threshold_margin"] == cut and f"margin > {cut:+.3g}" in eff.summary()


def test_the_study_ranks_a_plus_pair_under_the_order_it_ran(runs):
    """`Study.tradeoff` on a study whose "+" ensemble lists its members in the other order than
    `defenses`: the run is ranked and plotted as "disc+shift", never relabelled "shift+disc"
    (`Compose` applies its members in order); a "|" run is found in either order."""
    from types import SimpleNamespace

    from experiments.study import Study

    base, singles = runs
    plus = with_margins(predict(base, singles, "+"), -2.0, -2.0, "disc+shift")
    either = combine(base, {"disc": singles["disc"], "shift": singles["shift"]}, "|")
    written = {}
    stub = SimpleNamespace(
        cfg=SimpleNamespace(defenses=["shift", "disc"], ensembles=["disc+shift", "disc|shift"], weight=0.5),
        tables={"baseline": base, **singles, "disc+shift": plus, "disc|shift": either},
        run=SimpleNamespace(write_table=lambda name, rows: written.update({name: rows})))
    out = Study.tradeoff(stub)
    rows = {r["name"]: r for r in out["rows"]}
    assert "shift+disc" not in rows
    assert rows["disc+shift"]["measured_run"] == "disc+shift"
    assert (rows["disc+shift"]["measured_safety"], rows["disc+shift"]["measured_helpfulness"]) == \
        safety_helpfulness(plus)
    assert rows["shift|disc"]["measured_run"] == "disc|shift"
    measured_points = {p["name"] for p in out["points"] if p["measured"]}
    assert {"disc+shift", "disc|shift"} <= measured_points
