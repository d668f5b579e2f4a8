"""Honest statistics: aggregation on one scale, noise that changes nothing is "neither", and
intervals that cover the truth at their nominal rate on simulated data (benchmarks/coverage_table.py)."""

import importlib

import numpy as np
import pytest
import torch

from probing.aggregate import combine_margins
from probing.errors import ScoringError
from probing.plan import fold_variants
from probing import ScoreTable


# ---------------------------------------------------------------- aggregation (probing/aggregate.py)

def logit_mean_p(m: np.ndarray) -> np.ndarray:
    """Independent float64 formula: log(mean p) - log(mean (1 - p)), with 1 - p = 1 / (1 + e^m)."""
    p, q = 1 / (1 + np.exp(-m)), 1 / (1 + np.exp(m))
    return np.log(p.mean(0)) - np.log(q.mean(0))


def test_aggregation_rules_seeded():
    rng = np.random.default_rng(13)
    for k in (1, 2, 3, 5, 8):
        m = rng.normal(0, 4, (k, 50))
        m[:, :5] *= 10  # margins up to about +-100: far beyond the old clamp at +-13.8
        t = torch.tensor(m)
        np.testing.assert_allclose(combine_margins(t, "mean").numpy(), logit_mean_p(m), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(combine_margins(t, "majority").numpy(), np.median(m, 0), atol=1e-12)
        np.testing.assert_array_equal(combine_margins(t, "max").numpy(), m.max(0))
        np.testing.assert_array_equal(combine_margins(t, "min").numpy(), m.min(0))
        # the vote: a majority of refusing variants <=> a positive median margin (odd K, no zeros)
        if k % 2:
            assert ((m > 0).sum(0) > k / 2).tolist() == (combine_margins(t, "majority").numpy() > 0).tolist()
    # identical variants keep their margin under every rule, huge ones included
    for v in (-60.0, -13.9, 0.3, 13.9, 40.0, 90.0):
        same = torch.full((4, 1), v, dtype=torch.float64)
        for rule in ("mean", "majority", "max", "min"):
            assert float(combine_margins(same, rule)[0]) == pytest.approx(v, rel=1e-12, abs=1e-12), rule
    # huge margins are not truncated: two refusing variants at 40 and 30 average to about 30.69
    assert float(combine_margins(torch.tensor([[40.0], [30.0]]), "mean")[0]) == pytest.approx(
        -np.log((np.exp(-40) + np.exp(-30)) / 2), rel=1e-9)
    with pytest.raises(ScoringError, match="NaN"):
        combine_margins(torch.tensor([[1.0], [float("nan")]]), "mean")


def test_single_variant_keeps_the_raw_margin_bit_for_bit():
    rng = np.random.default_rng(2)
    m = torch.tensor(rng.normal(0, 20, 6), dtype=torch.float32)
    t = ScoreTable([f"q{i}" for i in range(6)], [None] * 6, m, torch.zeros(6, 1), [0])
    for rule in ("mean", "majority"):
        out, _, _ = fold_variants(t, [[i] for i in range(6)], rule)
        assert torch.equal(out, m)
        k1 = combine_margins(m[None].double(), rule).float()  # K = 1 through the formula: the same margin
        torch.testing.assert_close(k1, m, atol=1e-5, rtol=1e-6)


@pytest.fixture(scope="module")
def toy_runs():
    from probing import RefusalScorer, load_model
    from probing.datasets import toy

    bundle = load_model("toy")
    qs = toy.requests("test")
    scorer = RefusalScorer(bundle, batch_size=32, progress=False)
    return scorer, qs, scorer.score(qs)


@pytest.mark.parametrize("aggregate", ["mean", "majority"])
@pytest.mark.parametrize("factory", ["ni_text_smooth", "ni_image_gaussian"])
def test_noise_at_rate_zero_is_neither(toy_runs, factory, aggregate):
    import defenses
    from probing.analysis import compare

    scorer, qs, base = toy_runs
    d = getattr(defenses, factory)(k=3, rate=0.0, seed=0, aggregate=aggregate)
    table = scorer.score(qs, defense=d)
    assert table.meta["samples"] == 3
    torch.testing.assert_close(table.margin, base.margin, atol=1e-4, rtol=0)  # K copies of the query itself
    eff = compare(base, table, n_boot=200)
    assert eff.label == "neither", eff.summary()


# ---------------------------------------------------------------- interval coverage

def test_intervals_cover_at_the_nominal_rate():
    """Every figure of compare() on five simulated scenarios (n = 10..50 per class, unbalanced,
    Student-t tails). Seeded; 240 data sets per scenario, so the Monte Carlo SE of one coverage is
    0.014: the mean over the five scenarios (1200 data sets, SE 0.006) must lie in 0.93..0.97 for
    every figure, and each scenario's coverage in 0.90..0.99 (about 3.5 SE)."""
    from benchmarks.coverage_table import SCENARIOS, coverage

    cols = [coverage(s, n_datasets=240, n_boot=200, seed=1, rank=False) for s in SCENARIOS]
    figs = cols[0].keys()
    bad_mean = {f: round(np.mean([c[f] for c in cols]), 3) for f in figs
                if not 0.93 <= np.mean([c[f] for c in cols]) <= 0.97}
    bad_one = {(s.name, f): c[f] for s, c in zip(SCENARIOS, cols) for f in figs if not 0.90 <= c[f] <= 0.99}
    assert not bad_mean and not bad_one, (bad_mean, bad_one)


def test_rank_figures_cover_at_the_nominal_rate():
    from benchmarks.coverage_table import SCENARIOS, coverage

    cols = [coverage(s, n_datasets=200, n_boot=150, seed=2, only_rank=True) for s in SCENARIOS if s.n_h <= 30]
    for f in cols[0]:
        mean = np.mean([c[f] for c in cols])
        assert 0.93 <= mean <= 0.97 and all(0.90 <= c[f] <= 0.99 for c in cols), (f, [c[f] for c in cols])


def test_fixed_unit_under_covers_and_re_estimating_fixes_it():
    """The audit's failure, reproduced: holding the SD unit at the observed baseline value across
    resamples makes *_sd intervals far too narrow."""
    from benchmarks.coverage_table import Scenario
    from probing.analysis import interval_arrays, pooled_sd, separation_figures

    s = Scenario("normal 20/20", 20, 20, shift_h=3.0, shift_b=2.6, noise=0.3)  # the unit dominates the error
    truth = s.truth()["shift_sd"]
    b_h, b_b, d_h, d_b = s.sample(np.random.default_rng(4), (300,))
    unit = pooled_sd(b_h, b_b)  # [300]: one per data set, held fixed across its resamples
    fixed = interval_arrays(lambda *a: separation_figures(*a, unit=unit.reshape(unit.shape + (1,) * (a[0].ndim - 2))),
                            b_h, b_b, d_h, d_b, n_boot=200, seed=5, method="percentile")["shift_sd"]
    fresh = interval_arrays(separation_figures, b_h, b_b, d_h, d_b, n_boot=200, seed=5)["shift_sd"]
    cover = lambda e: ((e[1] <= truth) & (truth <= e[2])).mean()  # noqa: E731
    assert cover(fixed) < 0.7 and 0.92 <= cover(fresh) <= 0.98


def test_exact_rate_coverage_matches_simulation_and_known_properties():
    """The exact binomial coverage behind docs/analysis.md's refusal-rate table: equal to a seeded
    simulation of binomial counts, Clopper-Pearson never below nominal (its defining property),
    and Wilson's dip at n = 10 real (not a simulation artefact)."""
    from benchmarks.coverage_table import exact_rate_coverage
    from probing.analysis.metrics import wilson_ci

    rng = np.random.default_rng(3)
    for n, p in ((10, 0.6915), (12, 0.837), (40, 0.35)):
        k = rng.binomial(n, p, 200_000)
        lo, hi = wilson_ci(k, n)
        simulated = ((lo <= p) & (p <= hi)).mean()
        assert abs(simulated - exact_rate_coverage(n, p)[0]) < 0.003, (n, p, simulated)
    grid = np.linspace(0.05, 0.95, 181)
    assert exact_rate_coverage(10, grid, method="clopper_pearson").min() >= 0.95 - 1e-12
    assert exact_rate_coverage(10, 0.6915)[0] < 0.93  # the scenario cell of the table: discreteness
    assert 0.95 <= exact_rate_coverage(10, grid).mean() <= 0.96


def test_rate_intervals_keep_their_coverage_near_0_and_1():
    """Refusal rates often sit near 0 or 1. The plain Wilson interval covers 0.84 there (its lower end
    at one success is too high); compare()'s Wilson interval takes the one-sided Poisson end for 1-3
    successes (or failures), found here independently by solving P(X >= k; lam) = alpha with scipy's
    Poisson sf, and covers >= 0.925 for every true rate in 0.001-0.05 and 0.95-0.999 (exact sums)."""
    from scipy.optimize import brentq
    from scipy.stats import poisson

    from benchmarks.coverage_table import exact_rate_coverage
    from probing.analysis.metrics import wilson_ci

    for n in (10, 40, 200):
        k = np.arange(n + 1, dtype=float)
        lo, hi = wilson_ci(k, n)
        plain_lo, plain_hi = wilson_ci(k, n, boundary=False)
        for c in (1, 2, 3):
            lam = brentq(lambda m: poisson.sf(c - 1, m) - 0.05, 1e-9, 50)  # P(X >= c; lam) = 0.05
            assert lo[c] == pytest.approx(min(lam / n, plain_lo[c]), rel=1e-9), (n, c)
            assert hi[n - c] == pytest.approx(max(1 - lam / n, plain_hi[n - c]), rel=1e-9), (n, c)
        middle = slice(4, n - 3)
        assert np.array_equal(lo[middle], plain_lo[middle]) and np.array_equal(hi[middle], plain_hi[middle])
        assert np.all(lo <= plain_lo) and np.all(hi >= plain_hi) and lo[0] == 0 and hi[n] == 1
        edges = np.concatenate([np.linspace(0.001, 0.05, 491), np.linspace(0.95, 0.999, 491)])
        assert exact_rate_coverage(n, edges, method="wilson_plain").min() < 0.90, n  # the dip being fixed
        assert exact_rate_coverage(n, edges).min() >= 0.925, n


def test_design_effect_against_scipy_anova_and_simulated_variance():
    """`metrics.design_effect`: its F test is scipy's one-way ANOVA (equal and unequal groups), its
    icc the ANOVA estimator (for equal groups (F - 1) / (F + m - 1)), and its deff the variance of
    a mean over the variance it would have with independent values, by simulation."""
    from scipy.stats import f_oneway

    from probing.analysis.metrics import design_effect

    rng = np.random.default_rng(0)
    for sizes in ([3] * 12, [1, 2, 3, 4, 2, 3, 1, 5, 2]):
        groups = list(np.repeat(np.arange(len(sizes)), sizes))
        x = rng.normal(size=len(sizes)).repeat(sizes) + rng.normal(size=sum(sizes))
        deff, icc, n_groups, p = design_effect(x, groups)
        res = f_oneway(*[x[np.array(groups) == g] for g in range(len(sizes))])
        assert n_groups == len(sizes) and p == pytest.approx(res.pvalue, rel=1e-9)
        if len(set(sizes)) == 1:
            m = sizes[0]
            assert icc == pytest.approx((res.statistic - 1) / (res.statistic + m - 1), rel=1e-9)
            assert deff == pytest.approx(1 + (m - 1) * max(icc, 0), rel=1e-9)
    assert design_effect(x, [None] * len(x))[0] == 1.0  # every value its own group
    assert design_effect(np.ones(6), [0, 0, 1, 1, 2, 2])[0] == 1.0  # nothing to estimate
    assert design_effect(np.repeat([0.0, 1.0, 2.0], 2), [0, 0, 1, 1, 2, 2])[:2] == (2.0, 1.0)  # members equal
    groups = list(np.repeat(np.arange(20), 3))
    means, estimates = [], []
    for _ in range(1500):  # icc 0.5 in groups of 3: a mean's variance twice the independent one
        x = np.sqrt(0.5) * rng.normal(size=20).repeat(3) + np.sqrt(0.5) * rng.normal(size=60)
        means.append(x.mean())
        estimates.append(design_effect(x, groups)[0])
    assert np.var(means) * 60 == pytest.approx(2.0, rel=0.12) and np.mean(estimates) == pytest.approx(2.0, rel=0.1)


def _grouped(base, size=3):
    """``base`` with each class's rows in consecutive groups of ``size`` (meta "group")."""
    is_h = np.array([lab == "harmful" for lab in base.labels])
    within = np.where(is_h, np.cumsum(is_h) - 1, np.cumsum(~is_h) - 1)  # a row's place in its class
    group = [f"{lab}-req{k // size}" for lab, k in zip(base.labels, within)]
    return ScoreTable(base.ids, base.labels, base.margin, base.lens_margin, base.layers,
                      row_meta=[{"group": g} for g in group]), group, is_h


def test_cluster_draws_take_whole_groups_and_the_group_jackknife_is_exact_for_a_mean():
    from probing.analysis.compare import _cluster_draws, _group_jackknife

    rng = np.random.default_rng(0)
    codes = np.repeat(np.arange(5), 3)
    draws = _cluster_draws(rng, codes, (200,))
    assert draws.shape == (200, 15)
    for row in draws:  # five whole groups, each member once per draw of its group
        blocks = row.reshape(5, 3)
        assert all(len(set(codes[b])) == 1 and sorted(b) == list(np.flatnonzero(codes == codes[b[0]])) for b in blocks)
    drawn = np.bincount(codes[draws[:, ::3]].ravel(), minlength=5) / draws[:, ::3].size
    assert np.allclose(drawn, 0.2, atol=0.03)  # groups drawn uniformly
    mixed = np.array([0, 1, 1, 2, 2, 2, 3, 0, 4])
    for row in _cluster_draws(rng, mixed, (100,)):  # whole groups laid end to end, the last one cut
        pos = 0
        while pos < len(row):
            members = set(np.flatnonzero(mixed == mixed[row[pos]]))
            take = row[pos:pos + len(members)]
            assert set(take) <= members and len(set(take)) == len(take)
            assert len(take) == len(members) or pos + len(take) == len(row)  # only the last one cut
            pos += len(take)
    x = rng.normal(size=9)
    j = np.array([np.delete(x, i).mean() for i in range(9)])
    assert np.allclose(_group_jackknife(j, mixed), [x[mixed != g].mean() for g in range(5)])
    assert _group_jackknife(j, None) is j


def test_grouped_deliveries_are_resampled_whole():
    """Where the deliveries of one request move together, compare() resamples requests: the class
    change's interval widens by about sqrt(design effect), the other class's hardly moves, and
    without groups (or with every query its own group) the result is the query bootstrap's, bit for
    bit. By simulation (icc 0.5, 10 requests of 3 a class) the query bootstrap covers the harmful
    change about 0.83 of the time, the cluster bootstrap at least 0.91."""
    from probing.analysis import compare
    from probing.analysis.compare import interval_arrays, output_figures

    from .synthetic import make_baseline

    base = make_baseline(n_h=30, n_b=30, seed=5)
    grouped, group, is_h = _grouped(base)
    rng = np.random.default_rng(4)
    request_part = {g: rng.normal() for g in sorted(set(group))}
    shared = np.array([request_part[g] for g in group])
    delta = 0.5 + np.where(is_h, 0.8 * shared, 0.0) + 0.3 * rng.normal(size=60)
    moved = ScoreTable(base.ids, base.labels, base.margin + torch.tensor(delta, dtype=torch.float32),
                       base.lens_margin, base.layers)
    plain, clustered = compare(base, moved, n_boot=400), compare(grouped, moved, n_boot=400)
    width = lambda e, k: e[k].hi - e[k].lo  # noqa: E731
    deff = clustered.config["design_effect"]["harmful"]["deff"]
    assert deff > 2 and clustered.config["design_effect"]["harmful"]["groups"] == 10
    assert 0.7 * deff ** 0.5 < width(clustered, "harmful_change") / width(plain, "harmful_change") < 1.3 * deff ** 0.5
    assert 0.75 < width(clustered, "benign_change") / width(plain, "benign_change") < 1.3
    assert clustered["harmful_change"].value == plain["harmful_change"].value
    singletons = ScoreTable(base.ids, base.labels, base.margin, base.lens_margin, base.layers,
                            row_meta=[{"group": f"own{i}"} for i in range(60)])
    assert compare(singletons, moved, n_boot=200).estimates == compare(base, moved, n_boot=200).estimates

    d, n_groups, size = 200, 10, 3
    groups = list(np.repeat(np.arange(n_groups), size))
    sim = np.random.default_rng(9)

    def part(sd):
        return sd * (np.sqrt(0.5) * sim.normal(size=(d, n_groups)).repeat(size, -1)
                     + np.sqrt(0.5) * sim.normal(size=(d, n_groups * size)))
    bh, bb = 0.5 + part(1.0), -0.5 + part(1.0)
    dh, db = bh + 0.6 + part(0.5), bb + 0.2 + part(0.5)
    cover = {}
    for name, given in (("query", None), ("cluster", groups)):  # each class its own requests
        _, lo, hi, _ = interval_arrays(output_figures, bh, bb, dh, db, n_boot=200, seed=1, pairwise=False,
                                       groups_h=given and [f"h{g}" for g in given],
                                       groups_b=given and [f"b{g}" for g in given])["harmful_change"]
        cover[name] = ((lo <= 0.6) & (0.6 <= hi)).mean()
    assert cover["query"] < 0.88 and cover["cluster"] >= 0.91, cover


def test_grouped_edges_found_by_the_audit():
    """Cases an audit of the cluster bootstrap found: (1) a fractional count (a count over a design
    effect) keeps the Poisson end, so a design effect only widens a rate's interval; (2) the
    percentile method uses the effective sizes too; (3) a query without a group never joins the
    group named by its row number; (4) the request cut at the class size keeps a random part of
    itself, not its first deliveries."""
    from probing.analysis.compare import _cluster_draws, interval_arrays, output_figures
    from probing.analysis.metrics import design_effect, wilson_ci

    for c in (1, 2, 3):
        for deff in (1.0001, 1.5, 2.0, 3.01):
            lo, _ = wilson_ci(c / deff, 20 / deff)
            assert lo <= wilson_ci(c, 20)[0], (c, deff)
        _, hi = wilson_ci(20 / 1.0001 - c / 1.0001, 20 / 1.0001)
        assert hi >= wilson_ci(20 - c, 20)[1] - 1e-12, c

    rng = np.random.default_rng(0)
    shared = rng.normal(size=(10,)).repeat(3)
    bh, bb = 0.3 + shared + 0.3 * rng.normal(size=30), -0.3 + 0.3 * rng.normal(size=30)
    groups = list(np.repeat(np.arange(10), 3))
    width = {}
    for given in (None, groups):
        est = interval_arrays(output_figures, bh, bb, bh + 0.5, bb + 0.1, n_boot=200, seed=1, method="percentile",
                              pairwise=False, groups_h=given)
        width[given is None] = est["refusal_harmful_base"][2] - est["refusal_harmful_base"][1]
    assert width[False] > 1.2 * width[True], width

    values = np.array([5, 0, .1, 1, 1.1, 2, 2.1, 3, 3.1, 4, 4.1])
    ints = [None, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert design_effect(values, ints) == design_effect(values, [None] + [f"g{g}" for g in ints[1:]])
    assert design_effect(values, ints)[2] == 6

    sizes = [10] + [1] * 10
    codes = np.repeat(np.arange(len(sizes)), sizes)
    copies = np.bincount(_cluster_draws(np.random.default_rng(0), codes, (20000,)).ravel(), minlength=20) / 20000
    assert np.ptp(copies[:10]) < 0.08, copies[:10]  # the big request's deliveries drawn alike


def test_pairs_across_the_classes_are_resampled_together():
    """A request holding a harmful and a benign query (MOSSBench's pairs) is drawn once for both
    classes: in every resample the harmful and the benign query at a place come from the same pair,
    and requests of one class only fill the rest. With the pair's correlation across the classes
    (rho 0.8, 20 pairs) the common shift's interval covers about 0.87 resampling each class on its
    own, at least 0.92 resampling the pairs."""
    from probing.analysis.compare import _JointDraws, interval_arrays, output_figures

    gh, gb = [f"p{i}" for i in range(5)] + [None], [f"p{i}" for i in range(5)] + ["b0", "b0", None]
    assert _JointDraws.build(gh, [None] * 8) is None and _JointDraws.build(gh, None) is None
    ih, ib = _JointDraws.build(gh, gb)(np.random.default_rng(0), (300,))
    assert ih.shape == (300, 6) and ib.shape == (300, 8)
    assert np.array_equal(ih[:, :5], ib[:, :5])  # pair i is row i in both classes
    assert np.all(ih[:, 5] == 5) and np.isin(ib[:, 5:], [5, 6, 7]).all()

    from benchmarks.coverage_edges import pair_sample

    n = 20
    bh, bb, dh, db = pair_sample(np.random.default_rng(4), 300, n, 0.8)
    pairs = [f"pair{i}" for i in range(n)]
    cover = {}
    for name, given in (("classes", None), ("pairs", pairs)):
        _, lo, hi, _ = interval_arrays(output_figures, bh, bb, dh, db, n_boot=200, seed=5, pairwise=False,
                                       groups_h=given, groups_b=given)["common_shift"]
        cover[name] = ((lo <= 0.4) & (0.4 <= hi)).mean()
    assert cover["classes"] < 0.9 and cover["pairs"] >= 0.92, cover


def test_layer_profiles_resample_requests_too():
    """`layer_profile` (the layerwise experiment's figures) resamples whole requests like compare():
    the same values, wider intervals where a request's deliveries move together."""
    from probing.analysis import layer_profile

    from .synthetic import make_baseline

    base = make_baseline(n_h=30, n_b=30, seed=5)
    grouped, group, is_h = _grouped(base)
    rng = np.random.default_rng(4)
    request_part = {g: rng.normal() for g in sorted(set(group))}
    delta = torch.tensor(0.5 + 0.8 * np.array([request_part[g] for g in group]) + 0.3 * rng.normal(size=60),
                         dtype=torch.float32)
    moved = ScoreTable(base.ids, base.labels, base.margin + delta, base.lens_margin + delta[:, None], base.layers)
    plain, clustered = layer_profile(base, moved, n_boot=300), layer_profile(grouped, moved, n_boot=300)
    assert np.array_equal(plain.values["shift_sd"], clustered.values["shift_sd"])
    widths = lambda prof: prof.hi["shift_sd"] - prof.lo["shift_sd"]  # noqa: E731
    assert np.all(widths(clustered) > 1.3 * widths(plain)), (widths(plain), widths(clustered))


def test_a_class_of_few_requests_is_cautioned_by_its_requests():
    """The small-class caution counts what is resampled: requests where a class has groups."""
    from probing.analysis import compare

    from .synthetic import make_baseline, with_margins

    base = make_baseline(n_h=18, n_b=18, seed=2)
    grouped, _, _ = _grouped(base, size=3)  # 6 requests of 3 a class
    (caution,) = compare(grouped, with_margins(grouped, 1.0, 0.0, "x", noise=0.3), n_boot=200).cautions
    assert caution.startswith("only 6 requests (groups resampled whole) in a class")
    assert compare(base, with_margins(base, 1.0, 0.0, "x", noise=0.3), n_boot=200).cautions == []


def test_comparisons_say_where_their_intervals_cover_less(caplog):
    """`DefenseEffect.cautions`: a class under MIN_CLASS_FOR_COVERAGE queries (no interval from the
    resamples reaches 95% there), and an AUROC of 1 (complete separation): said in the summary, the
    row and the log. A defense that changes nothing gets no caution."""
    from probing.analysis import compare
    from probing.analysis.compare import MIN_CLASS_FOR_COVERAGE

    from .synthetic import make_baseline, with_margins

    apart = make_baseline(n_h=20, n_b=20, seed=3, sep=12.0)  # every harmful margin above every benign one
    assert float(apart.margin[:20].min()) > float(apart.margin[20:].max())
    with caplog.at_level("WARNING"):
        eff = compare(apart, with_margins(apart, 0.5, 0.0, "lifted", noise=0.1, seed=4), n_boot=200)
    assert eff["auroc_base"].value == 1.0 and eff["auroc_base"].lo < 0.95  # a width, not the point [1, 1]
    assert eff["auroc_change"].lo < 0 < eff["auroc_change"].hi  # not [0, 0]
    assert len(eff.cautions) == 1 and eff.cautions[0].startswith("auroc_base, auroc_def at 1")
    assert "caution: auroc_base, auroc_def at 1" in eff.summary() and eff.row()["cautions"] == eff.cautions[0]
    assert any("the classes separate completely" in r.getMessage() for r in caplog.records)

    base = make_baseline(n_h=20, n_b=20, seed=3)
    assert compare(base, with_margins(base, 0.0, 0.0, "nothing"), n_boot=200).cautions == []
    n = MIN_CLASS_FOR_COVERAGE - 3
    small = make_baseline(n_h=n, n_b=20, seed=3)
    (caution,) = compare(small, with_margins(small, 1.0, 0.0, "x", noise=0.2), n_boot=200).cautions
    assert caution.startswith(f"only {n} queries in a class: intervals cover at most {1 - 2.0 ** (1 - n):.0%}")


def test_auroc_score_interval_solves_its_equation_and_covers_near_one(monkeypatch):
    """`auroc_score_ci`: each end is a root of (a - t)^2 = z^2 V(t), V the Hanley-McNeil variance at
    t with both class sizes set to their mean, found here independently with scipy's brentq; and in
    a simulation near AUROC 1 (classes 3 SD apart, 10 a class, where the bootstrap covered 0.70 and
    the AUROC change 0.58), compare's intervals cover: auroc_base >= 0.93, auroc_change >= 0.93
    (0.99 at 2000 data sets, benchmarks/coverage_edges.py), where its bootstrap interval widened
    only at a sample AUROC of 1 (the rule before `AUROC_EDGE_SHARE`) covers less than 0.9 (0.87)."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    from benchmarks.coverage_table import Scenario
    from probing.analysis import interval_arrays, output_figures
    from probing.analysis.metrics import auroc_score_ci

    m, n = 12, 30
    k = (m + n) / 2 - 1
    for a in (1.0, 0.97, 0.73, 0.5, 0.1, 0.0):
        def g(t):
            var = t * (1 - t) * (1 + k * (1 - t) / (2 - t) + k * t / (1 + t)) / (m * n)
            return (a - t) ** 2 - norm.ppf(0.975) ** 2 * var
        lo, hi = auroc_score_ci(np.array([a]), m, n)
        want_lo = brentq(g, 1e-12, a - 1e-9) if a > 0 else 0.0  # g(a) <= 0 inside; g(0), g(1) >= 0
        want_hi = brentq(g, a + 1e-9, 1 - 1e-12) if a < 1 else 1.0
        assert lo[0] == pytest.approx(want_lo, abs=1e-9) and hi[0] == pytest.approx(want_hi, abs=1e-9), a

    s = Scenario("near one", 10, 10, sep=3.0)
    truth, data = s.truth(n=50_000), s.sample(np.random.default_rng(5), (400,))
    est = interval_arrays(output_figures, *data, n_boot=200, seed=6, pairwise=False)
    cover = {key: float(((est[key][1] <= truth[key]) & (truth[key] <= est[key][2])).mean())
             for key in ("auroc_base", "auroc_def", "auroc_change")}
    assert cover["auroc_base"] >= 0.93 and cover["auroc_def"] >= 0.93 and cover["auroc_change"] >= 0.93, cover
    compare_module = importlib.import_module("probing.analysis.compare")
    monkeypatch.setattr(compare_module, "AUROC_EDGE_SHARE", 1.01)  # never "piled up": the old rule
    _, lo, hi, _ = interval_arrays(output_figures, *data, n_boot=200, seed=6, pairwise=False)["auroc_change"]
    assert float(((lo <= truth["auroc_change"]) & (truth["auroc_change"] <= hi)).mean()) < 0.9


def test_auroc_change_near_the_edge_is_the_mover_hull_where_resamples_pile_up():
    """`_auroc_change_near_the_edge` against the MOVER formula written out with numpy's corrcoef:
    where at least AUROC_EDGE_SHARE of the resamples have an AUROC at 0 or 1 the interval is the
    hull of the bootstrap's and MOVER's; below that share the bootstrap's interval is returned as
    is; a correlation that is undefined (the baseline AUROC 1 in every resample) counts as 0."""
    from probing.analysis.compare import AUROC_EDGE_SHARE, _auroc_change_near_the_edge

    rng = np.random.default_rng(0)
    base = np.clip(0.95 + 0.04 * rng.normal(size=(3, 500)), 0, 1)
    base[0, :] = 1.0  # always at the edge: no correlation to estimate
    base[2] = np.clip(0.6 + 0.04 * rng.normal(size=500), 0, 1)  # far from the edge
    defended = np.clip(base + 0.02 + 0.02 * rng.normal(size=(3, 500)), 0, 1)
    defended[0] = np.clip(0.97 + 0.02 * rng.normal(size=500), 0, 1)
    share = (np.isin(base, (0, 1)) | np.isin(defended, (0, 1))).mean(-1)
    assert share[0] == 1 and share[1] >= AUROC_EDGE_SHARE and share[2] == 0, share
    vb, vd = np.array([1.0, 0.93, 0.6]), np.array([0.97, 0.95, 0.62])
    lb, hb, ld, hd = vb - [0.1, 0.08, 0.07], np.minimum(vb + [0.0, 0.05, 0.06], 1), vd - 0.09, np.minimum(vd + 0.04, 1)
    boot_lo, boot_hi = (vd - vb) - 0.01, (vd - vb) + 0.01  # narrow, as a squeezed bootstrap is
    out = {"auroc_base": (vb, lb, hb, 0), "auroc_def": (vd, ld, hd, 0), "auroc_change": (vd - vb, boot_lo, boot_hi, 0)}
    _, lo, hi, _ = _auroc_change_near_the_edge(out, base, defended)
    for i in range(3):
        r = 0.0 if i == 0 else np.corrcoef(base[i], defended[i])[0, 1]
        a, b = vd[i] - ld[i], hb[i] - vb[i]
        want_lo = vd[i] - vb[i] - np.sqrt(max(a * a + b * b - 2 * r * a * b, 0))
        a, b = vb[i] - lb[i], hd[i] - vd[i]
        want_hi = vd[i] - vb[i] + np.sqrt(max(a * a + b * b - 2 * r * a * b, 0))
        if i < 2:
            assert lo[i] == pytest.approx(min(want_lo, boot_lo[i]), abs=1e-12), i
            assert hi[i] == pytest.approx(max(want_hi, boot_hi[i]), abs=1e-12), i
        else:
            assert (lo[i], hi[i]) == (boot_lo[i], boot_hi[i])


def test_auroc_change_from_one_to_zero_is_no_point():
    """A defense that reverses a complete separation (AUROC 1 -> 0, every resample the same):
    the bootstrap's interval is the point [-1, -1]; the MOVER end must still reach towards 0 (the
    undefined correlation counts as 0, not 1, under which the two equal half-widths cancelled)."""
    from probing.analysis.compare import interval_arrays, output_figures

    rng = np.random.default_rng(1)
    b_h, b_b = 1.5 + rng.normal(size=10), -1.5 + rng.normal(size=10)
    b_h, b_b = b_h + (b_b.max() - b_h.min() + 0.1) * (b_h.min() <= b_b.max()), b_b  # complete separation
    v, lo, hi, _ = interval_arrays(output_figures, b_h, b_b, -b_h, -b_b, n_boot=50, seed=0, pairwise=False)["auroc_change"]
    assert v == -1 and lo == -1 and hi > -0.8, (v, lo, hi)
