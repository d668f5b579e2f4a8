"""Activation defenses are cross-fitted: a query of the direction table is edited with a direction
estimated without its fold; the plan's parts come back in input order; the fold map is recorded."""

import numpy as np
import pytest
import torch

from defenses import act_ablate, act_conditional_steer, act_steer, get_defense
from defenses.activation import crossfit_folds
from hooks import edit, hook_name
from probing import RefusalScorer, ScoreTable, load_model
from probing.datasets import toy
from probing.errors import InputError, ScoringError
from probing.plan import ScoringPlan, run_plan


@pytest.fixture(scope="module")
def setup():
    bundle = load_model("toy")
    qs = [q for q in toy.requests("test") if q.meta["kind"] == "text"][:24]
    scorer = RefusalScorer(bundle, keep_hidden=True, batch_size=32, progress=False)
    return bundle, qs, scorer, scorer.score(qs)


def by_hand_direction(table: ScoreTable, rows, layer: int) -> torch.Tensor:
    """Harmful mean minus benign mean of the given rows, in numpy float64 (independent of torch code)."""
    h = table.hidden[:, table.layers.index(layer)].double().numpy()
    lab = np.array(table.labels)
    rows = np.asarray(rows)
    d = h[rows[lab[rows] == "harmful"]].mean(0) - h[rows[lab[rows] == "benign"]].mean(0)
    return torch.tensor(d, dtype=torch.float32)


def test_folds_are_stratified_and_keyed_by_id(setup):
    _, _, _, base = setup
    folds = crossfit_folds(base, 5, seed=0)
    assert set(folds) == set(base.ids) and set(folds.values()) == set(range(5))
    assert crossfit_folds(base.select(list(reversed(base.ids))), 5, seed=0) == folds  # row order is irrelevant
    lab = dict(zip(base.ids, base.labels))
    for k in range(5):
        members = [q for q, f in folds.items() if f == k]
        assert {lab[q] for q in members} == {"harmful", "benign"}
    sizes = np.bincount(list(folds.values()))
    assert sizes.max() - sizes.min() <= 2  # round-robin within each class
    assert crossfit_folds(base, 5, seed=1) != folds
    with pytest.raises(InputError, match="n_folds"):
        crossfit_folds(base, 1)


def test_fold_direction_excludes_its_fold(setup):
    _, _, _, base = setup
    d = act_steer(base, alpha=1.0, layers=[1])
    for k, state in d.fold_states.items():
        train = [i for i, q in enumerate(base.ids) if d.folds[q] != k]
        torch.testing.assert_close(state["directions"][1], by_hand_direction(base, train, 1), atol=1e-5, rtol=0)
    # the full-table direction is the in-sample one
    torch.testing.assert_close(d.directions[1], by_hand_direction(base, range(len(base)), 1), atol=1e-5, rtol=0)
    # moving one query's hidden state changes every direction except its own fold's
    q0 = base.ids[0]
    bumped = base.select(base.ids)
    bumped.hidden = bumped.hidden.clone()
    bumped.hidden[0, :, :] += 5.0
    d2 = act_steer(bumped, alpha=1.0, layers=[1])
    k0 = d.folds[q0]
    torch.testing.assert_close(d2.fold_states[k0]["directions"][1], d.fold_states[k0]["directions"][1])
    assert all(not torch.allclose(d2.fold_states[k]["directions"][1], d.fold_states[k]["directions"][1])
               for k in d.fold_states if k != k0)


def test_crossfit_scores_equal_manual_fold_edits_in_input_order(setup):
    bundle, qs, scorer, base = setup
    d = act_steer(base, alpha=3.0, layers=[1])
    extra = [q for q in toy.requests("test") if q.meta["kind"] == "text"][24:28]  # not in the direction table
    mixed = [extra[0], *qs[::-1], *extra[1:]]  # any order; rows must come back in it
    plain = RefusalScorer(bundle, batch_size=32, progress=False)
    got = plain.score(mixed, defense=d)
    assert got.ids == [q.id for q in mixed]
    want = {}
    for k in d.fold_states:
        fold_qs = [q for q in qs if d.folds[q.id] == k]
        train = [i for i, q in enumerate(base.ids) if d.folds[q] != k]
        r = by_hand_direction(base, train, 1)
        with edit(bundle, {hook_name(1, "hook_resid_post"): lambda a, c, r=r: a + 3.0 * r}):
            t = plain.score(fold_qs)
        want.update(zip(t.ids, t.margin.tolist()))
    r_full = by_hand_direction(base, range(len(base)), 1)
    with edit(bundle, {hook_name(1, "hook_resid_post"): lambda a, c: a + 3.0 * r_full}):
        t = plain.score(extra)
    want.update(zip(t.ids, t.margin.tolist()))
    torch.testing.assert_close(got.margin, torch.tensor([want[q.id] for q in mixed]), atol=2e-5, rtol=0)
    # the record says which queries estimated each direction
    cf = got.meta["cross_fit"]
    assert cf["folds"] == d.folds and cf["n_folds"] == 5 and got.meta["params"]["cross_fit"] is True
    # in-sample (the old behaviour) differs for the table's queries and equals the full direction
    old = plain.score(qs, defense=act_steer(base, alpha=3.0, layers=[1], cross_fit=False))
    with edit(bundle, {hook_name(1, "hook_resid_post"): lambda a, c: a + 3.0 * r_full}):
        torch.testing.assert_close(old.margin, plain.score(qs).margin, atol=2e-5, rtol=0)
    assert "cross_fit" not in old.meta and old.meta["params"]["cross_fit"] is False


def test_ablate_and_conditional_fit_offsets_and_midpoints_out_of_fold(setup):
    _, _, _, base = setup
    a = act_ablate(base, layers=[2])
    c = act_conditional_steer(base, probe_layer=0, layers=[2])
    h0 = base.hidden[:, base.layers.index(0)].double().numpy()
    h2 = base.hidden[:, base.layers.index(2)].double().numpy()
    lab = np.array(base.labels)
    for k in a.fold_states:
        train = np.array([i for i, q in enumerate(base.ids) if a.folds[q] != k])
        u = by_hand_direction(base, train, 2).double().numpy()
        u /= np.linalg.norm(u)
        benign = train[lab[train] == "benign"]
        assert a.fold_states[k]["offsets"][2] == pytest.approx((h2[benign] @ u).mean(), abs=1e-5)
        u0 = by_hand_direction(base, train, 0).double().numpy()
        u0 /= np.linalg.norm(u0)
        mid = ((h0[train[lab[train] == "harmful"]] @ u0).mean() + (h0[benign] @ u0).mean()) / 2
        assert c.fold_states[k]["midpoint"] == pytest.approx(mid, abs=1e-5)
    assert get_defense("act_ablate", baseline=base).params["cross_fit"] is True
    assert get_defense("act_ablate", baseline=base, cross_fit=False).fold_states == {}


def test_partitioned_plan_must_cover_every_query_once(setup):
    bundle, qs, scorer, _ = setup
    sub = ScoringPlan("x", [[(q, None)] for q in qs[:2]])
    bad = ScoringPlan("bad", parts=[([0, 1], sub)])
    with pytest.raises(ScoringError, match="partition"):
        run_plan(scorer, qs[:3], bad)


def test_composites_stay_cross_fitted(setup):
    """Inside "a+b" a cross-fitted defense edits each query with its own fold's direction: composed
    with a defense that changes nothing, it scores exactly as alone; composed with a prompt defense,
    each fold's queries score as the composite built from that fold's in-sample-free state."""
    from defenses import Compose, Defense, sr_self_reminder

    bundle, qs, scorer, base = setup
    steer = act_steer(base, alpha=1.0)
    plain = RefusalScorer(bundle, layers=None, batch_size=32, progress=False)
    alone = plain.score(qs, defense=steer)
    with_noop = plain.score(qs, defense=Compose(members=[steer, Defense(name="noop")]))
    torch.testing.assert_close(with_noop.margin, alone.margin, atol=0, rtol=0)
    assert with_noop.meta["params"]["act_steer"]["cross_fit"] is True
    composite = plain.score(qs, defense=Compose(members=[sr_self_reminder(), steer]))
    for k, state in steer.fold_states.items():  # by hand: each fold with its own state's edits
        rows = [i for i, q in enumerate(qs) if steer.folds.get(q.id) == k]
        sub = [qs[i] for i in rows]
        spec = sr_self_reminder().spec
        with edit(bundle, steer.make_edits(state), positions=steer.edit_positions):
            want = plain.score(sub, prompt=spec)
        torch.testing.assert_close(composite.margin[rows], want.margin, atol=1e-5, rtol=0, msg=f"fold {k}")
    in_sample = plain.score(qs, defense=Compose(members=[sr_self_reminder(), act_steer(base, cross_fit=False)]))
    assert not torch.equal(in_sample.margin, composite.margin)
