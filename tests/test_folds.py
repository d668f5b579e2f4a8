"""Cross-fitting folds deal whole request groups: a request delivered several ways (the toy's text,
typography and picture of one phrase; MM-SafetyBench's kinds of one question) never has one
delivery in the fitting folds and another in the evaluated fold. Checked with plain numpy and
scikit-learn's metrics, against the loaders' real groups, and on a planted leak."""

import logging

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from defenses import act_steer
from defenses.activation import crossfit_folds
from probing import ScoreTable
from probing.analysis import diffmean_scores, layer_profile, pair_tables, stratified_folds
from probing.analysis.folds import grouped_folds, groups_per_class
from probing.datasets import toy
from probing.errors import InputError, QueryError
from probing.query import Query, row_meta


def synthetic_groups(seed=0):
    """Rows of groups of 1-4 queries: harmful-only, benign-only and mixed groups, some rows
    ungrouped (their own group), in a shuffled row order."""
    rng = np.random.default_rng(seed)
    ids, labels, groups = [], [], []
    for g in range(30):
        size = int(rng.integers(1, 5))
        kind = ("harmful", "benign", "mixed")[g % 3]
        for j in range(size):
            ids.append(f"g{g}-{j}")
            labels.append(kind if kind != "mixed" else ("harmful", "benign")[j % 2])
            groups.append(f"request{g}")
    for i in range(12):  # queries without a group
        ids.append(f"lone{i}")
        labels.append(("harmful", "benign")[i % 2])
        groups.append(None)
    order = rng.permutation(len(ids))
    return [ids[i] for i in order], [labels[i] for i in order], [groups[i] for i in order]


def fold_array(folds: dict, ids) -> np.ndarray:
    return np.array([folds[i] for i in ids])


@pytest.mark.parametrize("n_folds", [2, 3, 5])
@pytest.mark.parametrize("seed", [0, 1])
def test_grouped_folds_keep_groups_whole_and_spread_classes(n_folds, seed):
    ids, labels, groups = synthetic_groups(seed)
    folds = fold_array(grouped_folds(ids, labels, groups, n_folds, seed), ids)
    unit = np.array([g if g is not None else f"id:{q}" for q, g in zip(ids, groups)])
    lab = np.array(labels)
    for k in range(n_folds):  # a group in the evaluated fold has no row in the fitting folds
        assert not set(unit[folds == k]) & set(unit[folds != k])
    # every fold holds both classes, and as many groups of each class as any other, give or take one
    for cls in ("harmful", "benign"):
        per_fold = [len(set(unit[(folds == k) & (lab == cls)])) for k in range(n_folds)]
        assert min(per_fold) >= 1 and max(per_fold) - min(per_fold) <= 1, (cls, per_fold)
    # row order and seed
    order = np.random.default_rng(9).permutation(len(ids))
    shuffled = grouped_folds([ids[i] for i in order], [labels[i] for i in order], [groups[i] for i in order],
                             n_folds, seed)
    assert shuffled == grouped_folds(ids, labels, groups, n_folds, seed)
    assert grouped_folds(ids, labels, groups, n_folds, seed + 10) != grouped_folds(ids, labels, groups, n_folds, seed)


def test_without_groups_folds_are_stratified_by_label_over_ids():
    ids = [f"q{i}" for i in range(23)]
    labels = ["harmful"] * 10 + ["benign"] * 13
    folds = fold_array(grouped_folds(ids, labels, None, 5, 0), ids)
    lab = np.array(labels)
    for cls, n in (("harmful", 10), ("benign", 13)):
        sizes = np.bincount(folds[lab == cls], minlength=5)
        assert sizes.sum() == n and sizes.max() - sizes.min() <= 1
    # a group name equal to another query's id does not merge the two
    assert groups_per_class(["a", "b"], ["harmful", "harmful"], ["b", None]) == {"harmful": 2, "benign": 0}


def toy_table(queries) -> ScoreTable:
    """A ScoreTable of the queries as the scorer would build its rows (no model needed to fold)."""
    n = len(queries)
    return ScoreTable([q.id for q in queries], [q.label for q in queries], torch.zeros(n), torch.zeros(n, 1), [0],
                      row_meta=[row_meta(q) for q in queries])


def test_toy_deliveries_of_a_phrase_share_one_fold():
    """The audit's case: on id folds 23 of the toy test split's 32 phrases had deliveries in more
    than one fold. Both fold functions now keep every phrase's deliveries together."""
    qs = toy.requests("test")
    phrase = np.array([q.meta["phrase"] for q in qs])
    assert len({q.meta["group"] for q in qs}) == len(set(phrase)) == 32
    table = toy_table(qs)
    cross = fold_array(crossfit_folds(table, 5, seed=0), table.ids)
    paired = pair_tables(table, table, "lens_margin")
    layer = stratified_folds(paired.is_harmful, 5, 0, ids=paired.ids, groups=paired.groups)
    for folds in (cross, layer):
        assert all(len(set(folds[phrase == p])) == 1 for p in set(phrase))
        assert set(folds) == set(range(5))
    # a table saved before groups existed (no "group" in its rows): every query is its own group
    bare = ScoreTable(table.ids, table.labels, table.margin, table.lens_margin, table.layers)
    assert pair_tables(bare, bare).groups == [None] * len(qs)
    assert crossfit_folds(bare, 5, seed=0) == grouped_folds(bare.ids, bare.labels, None, 5, 0)


def test_too_few_groups_lower_or_refuse_the_folds(caplog):
    """Fold counts are checked in groups: 9 harmful queries of 3 phrases are 3 groups."""
    qs = [q for q in toy.requests("test", alarming=False) if q.meta["scenario"] in ("01-Illegal_Activity", "02-HateSpeech")]
    table = toy_table(qs)
    assert sum(q.label == "harmful" for q in qs) == 9
    with caplog.at_level(logging.INFO, logger="defenses.activation"):
        folds = crossfit_folds(table, 5, seed=0)
    assert set(folds.values()) == {0, 1, 2} and "only 3 groups hold the smaller class" in caplog.text
    with pytest.raises(InputError, match="at least 2 groups"):
        crossfit_folds(toy_table([q for q in qs if q.meta["phrase"] in ("steal cars", "wash cars", "visit banks")]))
    hidden = ScoreTable(table.ids, table.labels, table.margin, table.lens_margin, [0],
                        torch.randn(len(qs), 1, 4), row_meta=table.row_meta)
    with pytest.raises(InputError, match="only 3 groups hold harmful"):
        layer_profile(hidden, hidden, "diffmean", n_folds=4, n_boot=10)


def planted_leak(n_groups=60, size=3, d=1024, seed=0) -> ScoreTable:
    """Hidden states with no label signal at all: each request group has its own strong random
    vector, shared by its deliveries (plus small noise). Labels are one per group."""
    rng = np.random.default_rng(seed)
    ids, labels, metas, rows = [], [], [], []
    for g in range(n_groups):
        vec = rng.normal(0, 3.0, d)
        for j in range(size):
            ids.append(f"r{g}-{j}")
            labels.append("harmful" if g % 2 else "benign")
            metas.append({"group": f"r{g}"})
            rows.append(vec + rng.normal(0, 0.3, d))
    hidden = torch.tensor(np.array(rows)[:, None, :], dtype=torch.float32)
    n = len(ids)
    return ScoreTable(ids, labels, torch.zeros(n), torch.zeros(n, 1), [0], hidden, {"condition": "baseline"},
                      metas)


def test_planted_group_signal_does_not_leak_into_out_of_fold_separation():
    """Where the only signal is which request a delivery belongs to, a direction fitted on the
    other deliveries of the same request "separates" the classes; fitted on other requests only,
    it does not. Out-of-fold AUROC must stay near chance (scikit-learn's roc_auc_score)."""
    table = planted_leak()
    paired = pair_tables(table, table, "hidden")
    s0, _ = diffmean_scores(paired, n_folds=5, seed=0)
    auc = roc_auc_score(paired.is_harmful, s0[:, 0])
    assert auc < 0.75, auc  # 0.32-0.67 over seeds 0-7
    # the same scores from id folds (every delivery its own group) are inflated: the leak is real
    ungrouped = type(paired)(paired.ids, paired.is_harmful, paired.base, paired.defended)
    leaked, _ = diffmean_scores(ungrouped, n_folds=5, seed=0)
    assert roc_auc_score(paired.is_harmful, leaked[:, 0]) > 0.9  # 0.98-1.0 over seeds 0-7
    prof = layer_profile(table, table, "probe", n_boot=20)
    assert prof.values["auroc_base"][0] < 0.75


def test_diffmean_scores_ignore_row_order():
    """The folds come from ids, groups and labels, not positions: permuting the rows permutes the
    out-of-fold projections and nothing else."""
    table = planted_leak(n_groups=20, d=16, seed=3)
    order = list(np.random.default_rng(1).permutation(len(table)))
    shuffled = table.select([table.ids[i] for i in order])
    a, _ = diffmean_scores(pair_tables(table, table, "hidden"))
    b, _ = diffmean_scores(pair_tables(shuffled, shuffled, "hidden"))
    np.testing.assert_allclose(b, a[order], atol=1e-9)


def test_activation_defense_records_group_folds():
    table = planted_leak(n_groups=20, d=8)
    steer = act_steer(table, alpha=1.0)
    folds = steer.describe()["cross_fit"]["folds"]
    by_group = {}
    for q, meta in zip(table.ids, table.row_meta):
        by_group.setdefault(meta["group"], set()).add(folds[q])
    assert all(len(f) == 1 for f in by_group.values())
    assert "group" in steer.describe()["cross_fit"]["unit"]


@pytest.mark.parametrize("bad", [["a"], 1.5, True, " "])
def test_query_group_must_be_a_string_or_an_integer(bad):
    with pytest.raises(QueryError, match=r"query 'x': meta\['group'\]"):
        Query("x", "text", meta={"group": bad})
    assert Query("x", "text", meta={"group": 3}).meta["group"] == 3
