"""Defenses change exactly what they should, deterministically, and leave no hooks behind."""

import dataclasses
import re

import numpy as np
import pytest
import torch

from defenses import (Compose, Defense, Either, get_defense, ni_image_gaussian, ni_image_mask, ni_text_smooth,
                      sr_self_reminder)
from defenses.activation import act_ablate, act_steer, refusal_directions
from probing.plan import fold_variants
from hooks import capture, hook_name
from probing import PromptSpec, Query, RefusalScorer

from .conftest import noise_image


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def direction_table(tiny):
    qs = [Query(f"d{i}", f"request number {i} " + "x " * i, label="harmful" if i % 2 else "benign") for i in range(8)]
    return RefusalScorer(tiny, keep_hidden=True).score(qs)


def test_sr_changes_only_the_prompt(tiny, mixed_queries):
    d = sr_self_reminder()
    scorer = RefusalScorer(tiny, layers=None)
    via_defense = scorer.score(mixed_queries, defense=d)
    via_prompt = scorer.score(mixed_queries, prompt=d.spec)
    torch.testing.assert_close(via_defense.margin, via_prompt.margin, atol=1e-6, rtol=0)
    prompt = scorer.render(mixed_queries[:1], d.spec)[0]
    assert prompt.startswith(d.spec.system_prompt) and d.spec.text_after in prompt
    assert via_defense.meta["defense"] == "sr_self_reminder" and via_defense.meta["category"] == "SR"


def test_image_gaussian_noise_pixels_only_and_deterministic():
    q = Query("a", "What is this?", image=noise_image(0))
    t = Query("b", "text only")
    v1 = ni_image_gaussian(k=3, rate=0.2, seed=7).transform([q, t], None)
    v2 = ni_image_gaussian(k=3, rate=0.2, seed=7).transform([q, t], None)
    assert len(v1[0]) == 3 and len(v1[1]) == 1 and v1[1][0][0] is t
    orig = np.asarray(q.load_image(), dtype=float)
    for (a, _), (b, _) in zip(v1[0], v2[0]):
        assert a.text == q.text and np.array_equal(np.asarray(a.image), np.asarray(b.image))
        diff = np.asarray(a.image, dtype=float) - orig
        assert 0.1 * 255 < diff.std() < 0.3 * 255
    assert not np.array_equal(np.asarray(v1[0][0][0].image), np.asarray(v1[0][1][0].image))
    other = ni_image_gaussian(k=1, rate=0.2, seed=8).transform([q], None)[0][0][0]
    assert not np.array_equal(np.asarray(other.image), np.asarray(v1[0][0][0].image))


def test_image_mask_and_text_smooth():
    q = Query("a", "Tell me a story about cats", image=noise_image(1, size=(112, 112)))
    same = ni_image_mask(k=1, rate=0.0).transform([q], None)[0][0][0]
    assert np.array_equal(np.asarray(same.image), np.asarray(q.load_image()))
    masked = np.asarray(ni_image_mask(k=1, rate=1.0, patch=14).transform([q], None)[0][0][0].image)
    assert (masked == 128).all()
    half = np.asarray(ni_image_mask(k=1, rate=0.5, patch=14, seed=3).transform([q], None)[0][0][0].image)
    grey = (half == 128).all(-1).mean()
    assert 0.2 < grey < 0.8
    assert ni_text_smooth(k=1, rate=0.0).transform([q], None)[0][0][0].text == q.text
    smooth = ni_text_smooth(k=2, rate=0.5, seed=1).transform([q], None)[0]
    changed = [sum(a != b for a, b in zip(v.text, q.text)) / len(q.text) for v, _ in smooth]
    assert all(0.2 < c < 0.7 for c in changed) and smooth[0][0].image is q.image


def test_multi_sample_aggregation_is_mean_p(tiny, mixed_queries):
    d = ni_image_gaussian(k=3, rate=0.1, seed=0)
    scorer = RefusalScorer(tiny, layers=[0])
    table = scorer.score(mixed_queries[:4], defense=d)
    variants = d.transform(mixed_queries[:4], tiny)
    for i, (q, vs) in enumerate(zip(mixed_queries[:4], variants)):
        direct = scorer.score([dataclasses.replace(v, id=f"{q.id}#{k}") for k, (v, _) in enumerate(vs)])
        want = torch.logit(torch.sigmoid(direct.margin.double()).mean()).float()
        torch.testing.assert_close(table.margin[i], want, atol=1e-5, rtol=0)
    assert table.meta["samples"] == 3


def test_majority_is_configurable(tiny, mixed_queries):
    scorer = RefusalScorer(tiny, layers=None)
    d = ni_text_smooth(k=3, rate=0.2, seed=0, aggregate="majority")
    table = scorer.score(mixed_queries[:3], defense=d)
    variants = d.transform(mixed_queries[:3], tiny)
    for i, (q, vs) in enumerate(zip(mixed_queries[:3], variants)):
        direct = scorer.score([dataclasses.replace(v, id=f"{q.id}#{k}") for k, (v, _) in enumerate(vs)])
        # majority vote on the margin scale: the median variant margin (its sign is the vote)
        assert float(table.margin[i]) == pytest.approx(float(direct.margin.median()), abs=1e-5)
    assert table.meta["params"]["aggregate"] == "majority"


def test_majority_aggregation():
    from probing import ScoreTable

    t = ScoreTable(["a#0", "a#1", "a#2"], [None] * 3, torch.tensor([1.0, -2.0, 3.0]), torch.zeros(3, 1), [0])
    m, _, _ = fold_variants(t, [[0, 1, 2]], "majority")
    assert float(m[0]) == 1.0  # the median margin: 2 of 3 variants refuse, on the single-forward scale
    same = ScoreTable(["a#0", "a#1"], [None] * 2, torch.tensor([13.9, 13.9]), torch.zeros(2, 1), [0])
    for rule in ("mean", "majority"):  # identical variants keep their margin, unclamped
        assert float(fold_variants(same, [[0, 1]], rule)[0][0]) == pytest.approx(13.9, abs=1e-5)


def test_act_steer_equals_manual_edit_and_alpha_zero_is_identity(tiny, mixed_queries, direction_table):
    scorer = RefusalScorer(tiny, layers=None)
    base = scorer.score(mixed_queries)
    zero = scorer.score(mixed_queries, defense=act_steer(direction_table, alpha=0.0, layers=[1]))
    torch.testing.assert_close(zero.margin, base.margin, atol=1e-6, rtol=0)
    d = act_steer(direction_table, alpha=2.0, layers=[1])
    steered = scorer.score(mixed_queries, defense=d)
    r1 = refusal_directions(direction_table)[1]
    from hooks import edit

    with edit(tiny, {hook_name(1, "hook_resid_post"): lambda a, c: a + 2.0 * r1}):
        manual = scorer.score(mixed_queries)
    torch.testing.assert_close(steered.margin, manual.margin, atol=1e-6, rtol=0)
    assert (steered.margin - base.margin).abs().max() > 1e-3


@pytest.mark.parametrize("center", ["zero", "benign"])
def test_act_ablate_sets_the_projection(tiny, mixed_queries, direction_table, center):
    from hooks import edit
    from probing.render import encode

    d = act_ablate(direction_table, layers=[2], center=center)
    u = refusal_directions(direction_table)[2]
    u = u / u.norm()
    benign = [i for i, lab in enumerate(direction_table.labels) if lab == "benign"]
    keep = float((direction_table.hidden[benign, 2] @ u).mean()) if center == "benign" else 0.0
    enc = encode(tiny, RefusalScorer(tiny).render(mixed_queries[:3]), [q.load_image() for q in mixed_queries[:3]])
    name = hook_name(2)
    with capture(tiny, [name], "all") as plain, torch.no_grad():
        tiny.model.model(**enc, use_cache=False)
    # the edit is registered first, so the capture (a later hook) sees the edited stream
    with edit(tiny, d.edits(tiny)), capture(tiny, [name], "all") as ablated, torch.no_grad():
        tiny.model.model(**enc, use_cache=False)
    assert (plain[name] @ u - keep).abs().max() > 1e-2
    torch.testing.assert_close(ablated[name] @ u, torch.full_like(ablated[name] @ u, keep), atol=1e-4, rtol=0)
    want = plain[name] - ((plain[name] @ u) - keep)[..., None] * u
    torch.testing.assert_close(ablated[name], want, atol=1e-5, rtol=0)


def test_hooks_removed_after_scoring_and_after_failure(tiny, mixed_queries, direction_table):
    before = hook_count(tiny.model)
    RefusalScorer(tiny).score(mixed_queries[:3], defense=act_steer(direction_table, alpha=1.0))
    assert hook_count(tiny.model) == before

    class Boom(Defense):
        def edits(self, bundle):
            calls = {"n": 0}

            def fn(act, ctx):
                calls["n"] += 1
                if calls["n"] > 1:
                    raise RuntimeError("edit failed midway")
                return act
            return {hook_name(0): fn}

    with pytest.raises(RuntimeError, match="midway"):
        RefusalScorer(tiny, batch_size=2).score(mixed_queries, defense=Boom(name="boom"))
    assert hook_count(tiny.model) == before


def test_score_level_ensembles_follow_their_formula(tiny, mixed_queries):
    scorer = RefusalScorer(tiny, layers=[0, 1])
    a, b = sr_self_reminder(), get_defense("sr_mmsafety")
    ta, tb = scorer.score(mixed_queries, defense=a), scorer.score(mixed_queries, defense=b)
    p = torch.stack([ta.p_refuse, tb.p_refuse])
    either = scorer.score(mixed_queries, defense=Either(a, b))
    torch.testing.assert_close(either.p_refuse, p.max(0).values, atol=1e-5, rtol=0)
    both = scorer.score(mixed_queries, defense="sr_self_reminder&sr_mmsafety")
    torch.testing.assert_close(both.p_refuse, p.min(0).values, atol=1e-5, rtol=0)
    mean = scorer.score(mixed_queries, defense="sr_self_reminder~sr_mmsafety")
    torch.testing.assert_close(mean.p_refuse, p.mean(0), atol=1e-5, rtol=0)
    assert either.meta["defense"] == "sr_self_reminder|sr_mmsafety"


def test_compose_applies_all(tiny, mixed_queries, direction_table):
    c = get_defense("sr_self_reminder+ni_text_smooth")
    assert isinstance(c, Compose) and c.name == "sr_self_reminder+ni_text_smooth"
    vs = c.transform(mixed_queries[:2], tiny)
    assert len(vs[0]) == 4 and all(spec.system_prompt for _, spec in vs[0])
    steer_sr = Compose(members=[sr_self_reminder(), act_steer(direction_table, alpha=1.0, layers=[1])])
    scorer = RefusalScorer(tiny, layers=None)
    got = scorer.score(mixed_queries, defense=steer_sr)
    r1 = refusal_directions(direction_table)[1]
    from hooks import edit

    with edit(tiny, {hook_name(1, "hook_resid_post"): lambda a, ctx: a + r1}):
        want = scorer.score(mixed_queries, prompt=sr_self_reminder().spec)
    torch.testing.assert_close(got.margin, want.margin, atol=1e-6, rtol=0)


def test_compose_refuses_a_member_that_only_plans():
    """A score-level ensemble (or any defense whose only effect is its own plan()) inside "+"
    would be dropped silently: Compose names it and says what to write instead."""
    from defenses.composite import ScoreLevel
    from probing.errors import InputError

    either = get_defense("sr_self_reminder|sr_mmsafety")
    instead = "sr_self_reminder+sr_adashield_s|sr_mmsafety+sr_adashield_s"
    with pytest.raises(InputError, match=r"member 'sr_self_reminder\|sr_mmsafety' is a score-level ensemble.*"
                                         + re.escape(repr(instead))):
        Compose(members=[either, get_defense("sr_adashield_s")])
    suggested = get_defense(instead)  # what the message suggests: the "+" inside each member
    assert isinstance(suggested, ScoreLevel) and [m.name for m in suggested.members] == instead.split("|")

    class PlanOnly(Defense):
        def plan(self, queries, bundle):
            return super().plan(queries, bundle)

    with pytest.raises(InputError, match="member 'planner' only overrides plan()"):
        Compose(members=[sr_self_reminder(), PlanOnly(name="planner")])
    Compose(members=[sr_self_reminder(), Compose(members=[sr_self_reminder(), ni_text_smooth()])])  # nested "+": fine


def test_generation_based_defense_is_batched(tiny, mixed_queries):
    from probing.generation import generate
    from defenses.rewriting import qr_caption, qr_caption_no_image

    img_qs = [q for q in mixed_queries if q.has_image][:3]
    batched = generate(tiny, img_qs, max_new_tokens=4, batch_size=3)
    single = [generate(tiny, [q], max_new_tokens=4)[0] for q in img_qs]
    assert batched == single
    v = qr_caption(max_new_tokens=4).transform(img_qs + mixed_queries[:1], tiny)
    assert v[0][0][0].text.startswith("The image shows: ") and v[0][0][0].image is img_qs[0].image
    assert v[-1][0][0] is mixed_queries[0]  # text-only: unchanged
    v2 = qr_caption_no_image(max_new_tokens=4).transform(img_qs[:1], tiny)
    assert v2[0][0][0].image is None


@pytest.mark.parametrize("name,params,match", [
    ("act_steer", {"alpha": float("nan")}, "alpha"),
    ("ni_image_gaussian", {"k": 0}, "'k'"),
    ("ni_text_smooth", {"rate": 1.5}, "'rate'"),
    ("ni_image_mask", {"rate": -0.1}, "'rate'"),
    ("mo_checkpoint", {"path": "/nonexistent/ckpt"}, "'path'"),
    ("mo_finetune", {"lr": float("inf")}, "'lr'"),
    ("qr_caption", {"max_new_tokens": 0}, "max_new_tokens"),
    ("ni_text_smooth", {"aggregate": "median"}, "'aggregate'"),
    ("ni_image_gaussian", {"seed": -1}, "'seed'"),
    ("ni_image_gaussian", {"seed": 1.5}, "'seed'"),
    ("ni_text_smooth", {"seed": "a"}, "'seed'"),
    ("ni_image_mask", {"patch": 2.5}, "'patch'"),
    ("ni_image_mask", {"patch": 0}, "'patch'"),
    ("ni_image_gaussian", {"k": True}, "'k'"),
    ("mo_finetune", {"batch_size": 0}, "'batch_size'"),
    ("mo_finetune", {"batch_size": -3}, "'batch_size'"),
    ("mo_finetune", {"seed": -1}, "'seed'"),
    ("mo_finetune", {"steps": True}, "'steps'"),
    ("ni_text_smooth", {"rate": "abc"}, "parameter 'rate' must be a number"),
    ("ni_image_gaussian", {"rate": None}, "parameter 'rate' must be a number"),
    ("ni_text_smooth", {"rate": True}, "parameter 'rate' must be a number"),
    ("mo_finetune", {"lr": "0.1"}, "parameter 'lr' must be a number"),
    ("qr_caption", {"max_new_tokens": True}, "max_new_tokens"),
    ("sr_custom", {"text_after": 5}, "parameter 'text_after' must be text"),
    ("sr_custom", {"system_prompt": ["a"]}, "parameter 'system_prompt' must be text"),
])
def test_bad_parameters_name_the_parameter(name, params, match, direction_table):
    if name == "act_steer":
        params = {**params, "table": direction_table}
    with pytest.raises(ValueError, match=match):
        get_defense(name, **params)


def test_registering_an_edited_definition_again_uses_the_new_one(caplog):
    """A notebook cell that defines and registers a factory, edited (a text constant, a default)
    and run again: the new factory replaces the old one, logged; another factory under a taken
    name is still refused."""
    import logging

    from defenses import REGISTRY, register, sr_custom
    from probing.errors import InputError

    cell = "def my_sr({args}):\n    return sr_custom(text_after={text}, name='my_sr')\nregister('my_sr', my_sr)\n"
    notebook = {"__name__": "__main__", "sr_custom": sr_custom, "register": register}
    try:
        exec(cell.format(args="", text="'Be careful.'"), notebook)
        assert get_defense("my_sr").spec.text_after == "Be careful."
        with caplog.at_level(logging.INFO, logger="defenses.registry"):
            exec(cell.format(args="", text="'Refuse anything dangerous.'"), notebook)
        assert get_defense("my_sr").spec.text_after == "Refuse anything dangerous."
        assert "'my_sr'" in caplog.text and "replacing" in caplog.text
        exec(cell.format(args="k=4", text="f'x{k}'"), notebook)
        assert get_defense("my_sr").spec.text_after == "x4"
        with pytest.raises(InputError, match="'my_sr' is already registered"):
            register("my_sr", lambda: sr_custom(text_after="other", name="my_sr"))
        with pytest.raises(InputError, match="'sr_self_reminder' is already registered"):
            register("sr_self_reminder", notebook["my_sr"])
        assert get_defense("my_sr").spec.text_after == "x4"
    finally:
        REGISTRY.pop("my_sr", None)


def test_unknown_names_list_what_exists():
    with pytest.raises(ValueError, match="available: .*sr_self_reminder"):
        get_defense("sr_nope")
    with pytest.raises(ValueError, match="unknown defense 'nope'"):
        get_defense("sr_self_reminder+nope")


def test_conditional_steer_steers_only_flagged_queries(tiny, mixed_queries, direction_table):
    from defenses import act_conditional_steer

    scorer = RefusalScorer(tiny, layers=None)
    base = scorer.score(mixed_queries)
    never = scorer.score(mixed_queries, defense=act_conditional_steer(direction_table, probe_layer=0, alpha=2.0,
                                                                     threshold=1e9, layers=[2]))
    torch.testing.assert_close(never.margin, base.margin, atol=1e-6, rtol=0)
    always = scorer.score(mixed_queries, defense=act_conditional_steer(direction_table, probe_layer=0, alpha=2.0,
                                                                      threshold=-1e9, layers=[2]))
    steered = scorer.score(mixed_queries, defense=act_steer(direction_table, alpha=2.0, layers=[2]))
    torch.testing.assert_close(always.margin, steered.margin, atol=1e-6, rtol=0)
    # a threshold between the queries' probe scores steers some and leaves the others exactly as they were
    d = act_conditional_steer(direction_table, probe_layer=0, alpha=2.0, threshold=0.0, layers=[2])
    mid = scorer.score(mixed_queries, defense=d)
    same = (mid.margin - base.margin).abs() < 1e-6
    moved = (mid.margin - steered.margin).abs() < 1e-6
    assert bool((same | moved).all())
    with pytest.raises(ValueError, match="after probe_layer"):
        act_conditional_steer(direction_table, probe_layer=2, layers=[1])


def test_intention_and_rewrite_use_the_models_answer(tiny, mixed_queries):
    from probing.generation import generate
    from defenses.rewriting import qr_intention, qr_rewrite

    qs = mixed_queries[:3]
    v = qr_intention(max_new_tokens=3).transform(qs, tiny)
    answers = generate(tiny, [Query(q.id, qr_intention().question.format(text=q.text), q.image) for q in qs], 3)
    for (vq, spec), q, a in zip((x[0] for x in v), qs, answers):
        assert vq.text == q.text and vq.image is q.image and vq.meta["intention"] == a
        assert spec.text_before == f"Intention: {a}"
    r = qr_rewrite(max_new_tokens=3).transform(qs, tiny)
    rewrites = generate(tiny, [Query(q.id, qr_rewrite().question.format(text=q.text), q.image) for q in qs], 3)
    for (vq, spec), q, a in zip((x[0] for x in r), qs, rewrites):
        assert vq.text == (a or q.text) and vq.meta["rewrite"] == a and spec == PromptSpec()


# -- noise injection on arrays: the same bytes as the per-sample PIL round trips it replaced -----

def _old_gaussian(q, rate, rng):
    arr = np.asarray(q.load_image(), dtype=np.float64) / 255.0
    noisy = np.clip(arr + rng.normal(0.0, rate, arr.shape), 0, 1)
    return (noisy * 255).round().astype(np.uint8)


def _old_mask(q, rate, patch, rng):
    arr = np.array(q.load_image())
    h, w = arr.shape[:2]
    for y in range(0, h, patch):
        for x in range(0, w, patch):
            if rng.random() < rate:
                arr[y:y + patch, x:x + patch] = 128
    return arr


@pytest.mark.parametrize("size", [(112, 112), (101, 67), (300, 257)])
def test_image_noise_equals_the_pil_formula(size):
    from PIL import Image

    from defenses.noise import _rng

    rgba = Image.fromarray(np.random.default_rng(9).integers(0, 256, (size[1], size[0], 4), dtype=np.uint8))
    for q in (Query("img-1", "What is this?", image=noise_image(4, size=size)), Query("img-2", "x", image=rgba)):
        for rate, seed in ((0.05, 0), (0.3, 11)):
            got = ni_image_gaussian(k=3, rate=rate, seed=seed).transform([q], None)[0]
            for k, (v, _) in enumerate(got):
                want = _old_gaussian(q, rate, _rng(seed, q.id, k))
                assert np.array_equal(np.asarray(v.image), want), (q.id, rate, seed, k)
            for patch in (14, 9, 1000):
                got = ni_image_mask(k=3, rate=rate * 2, seed=seed, patch=patch).transform([q], None)[0]
                for k, (v, _) in enumerate(got):
                    want = _old_mask(q, rate * 2, patch, _rng(seed, q.id, k))
                    assert np.array_equal(np.asarray(v.image), want), (q.id, rate, seed, patch, k)
        # perturb() alone (the public per-sample call) gives the same as transform()
        d = ni_image_mask(k=1, rate=0.4, seed=2, patch=7)
        assert np.array_equal(np.asarray(d.perturb(q, _rng(2, q.id, 0)).image),
                              np.asarray(d.transform([q], None)[0][0][0].image))


def test_lora_auto_decides_from_the_config(llava_assets):
    """LoRA by default; lora="auto": full fine-tuning for the toy, LoRA for a 7B config (counted on
    the meta device)."""
    from transformers import LlavaConfig

    from defenses import mo_finetune
    from defenses.finetune import language_model_parameters, use_lora
    from probing import load_model

    toy = load_model("toy")
    assert language_model_parameters(toy.model.config) < 1e7 and not use_lora("auto", toy.model.config)
    big = LlavaConfig.from_pretrained(llava_assets)  # LLaVA-1.5-7B's config; no weights are built
    assert 6.5e9 < language_model_parameters(big) < 7e9 and use_lora("auto", big)
    assert not use_lora(False, big) and use_lora(True, toy.model.config)
    assert mo_finetune().lora is True and mo_finetune().params["lora"] is True
    d = mo_finetune(steps=1, batch_size=2, lora="auto")
    assert d.lora == "auto" and d.params["lora"] == "auto"
    d.model(toy)
    assert d.describe()["lora_used"] is False
    with pytest.raises(ValueError, match="'lora'"):
        mo_finetune(lora="yes")


def test_safety_examples_refuse_harmful_and_keep_the_context_rules():
    """mo_finetune's data: every harmful request refused; about half of the requests inside the
    toy's instruction-tuning contexts; a benign request refused only where the toy's own policy
    refuses it (alarming words, or a cautious image request under a safety instruction)."""
    from defenses.finetune import safety_examples
    from probing.datasets import toy as data

    examples = safety_examples(0)
    requests = [e for e in examples if e.query.meta.get("task") != "caption"]
    assert len(examples) > len(requests) >= 160
    assert all(e.target in data.REFUSALS for e in requests if e.query.label == "harmful")
    in_context = [e for e in requests if "noise" in e.query.meta]  # set by data.in_context
    assert 0.4 < len(in_context) / len(requests) < 0.6
    assert any(e.query.text not in {q.text for q in data.requests("train", 1000, repeats=2)} for e in in_context)
    benign_refused = [e for e in requests if e.query.label == "benign" and e.target in data.REFUSALS]
    assert benign_refused
    for e in benign_refused:
        assert e.query.meta.get("trigger") or e.query.meta["phrase"] in data.CAUTIOUS_BENIGN, e.query.text
    bare = [e for e in requests if "noise" not in e.query.meta and e.query.meta["phrase"] in data.CAUTIOUS_BENIGN
            and e.query.meta["kind"] != "text"]
    assert {e.target in data.REFUSALS for e in bare} == {True, False}
    assert all((e.target in data.REFUSALS) == (e.system in data.SAFETY_SYSTEM) for e in bare)
    assert [e.target for e in safety_examples(0)] == [e.target for e in examples]  # seeded


def test_lora_copy_shares_the_frozen_weights():
    from defenses import mo_finetune
    from probing import load_model

    toy = load_model("toy")
    flags = [p.requires_grad for p in toy.model.parameters()]
    before = {n: p.detach().clone() for n, p in toy.model.named_parameters()}
    tuned = mo_finetune(steps=2, batch_size=2, lora=True).model(toy)
    shared = dict(tuned.model.named_parameters())
    w = toy.model.model.multi_modal_projector.linear_1.weight
    assert shared["model.multi_modal_projector.linear_1.weight"].data_ptr() == w.data_ptr()  # no copy
    assert [p.requires_grad for p in toy.model.parameters()] == flags  # the original's flags untouched
    assert all(torch.equal(p, before[n]) for n, p in toy.model.named_parameters())  # nor its values


def test_fine_tuning_is_seeded_and_leaves_the_global_rng_as_it_was(monkeypatch):
    """The tune is seeded (the same adapters whatever the global RNG state before) without changing
    the global torch RNG: the CPU generator's state is restored, and while CUDA is not initialised
    no CUDA seed is set or queued (torch.manual_seed queues one for when CUDA starts)."""
    from defenses import mo_finetune
    from probing import load_model

    toy = load_model("toy")
    cuda_seeds = []
    real_seed_all = torch.cuda.manual_seed_all
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: cuda_seeds.append(seed) or real_seed_all(seed))
    cuda_before = torch.cuda.is_initialized()
    tuned = []
    for outside in (1, 2):
        torch.manual_seed(outside)
        state = torch.get_rng_state()
        tuned.append(mo_finetune(steps=2, batch_size=2, lora=True).model(toy))
        assert torch.equal(torch.get_rng_state(), state)
    if not cuda_before:
        assert cuda_seeds == [1, 2]  # the test's own torch.manual_seed calls, none from the tunes
    lora = [{n: p for n, p in t.model.named_parameters() if "lora_" in n} for t in tuned]
    assert lora[0] and all(torch.equal(p, lora[1][n]) for n, p in lora[0].items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fine_tuning_on_a_gpu_leaves_the_cuda_rng_as_it_was():
    """On a GPU the tune's seeding is undone on every CUDA device too (it used to reseed them)."""
    from defenses import mo_finetune
    from probing import load_model

    toy = load_model("toy", device="cuda")
    torch.cuda.manual_seed_all(1234)
    before = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    cpu = torch.get_rng_state()
    mo_finetune(steps=2, batch_size=2, lora=True).model(toy)
    assert torch.equal(torch.get_rng_state(), cpu)
    assert all(torch.equal(torch.cuda.get_rng_state(i), s) for i, s in enumerate(before))


def test_merging_the_adapters_leaves_the_original_untouched():
    """`merge_adapters` (what the study does before saving a tuned model): the merged copy computes
    what the adapters computed, and the original's weights, which the copy shared, keep their
    values. peft's own merge would add the deltas to them in place."""
    from defenses import mo_finetune
    from defenses.finetune import merge_adapters
    from probing import load_model
    from probing.datasets import toy as data
    from probing.render import encode, render_prompt

    toy = load_model("toy")
    before = {n: p.detach().clone() for n, p in toy.model.named_parameters()}
    tuned = mo_finetune(steps=3, batch_size=2, lora=True).model(toy)
    queries = data.requests("test")[:6]
    inputs = encode(toy, [render_prompt(toy.processor, q) for q in queries], [q.load_image() for q in queries])
    with torch.no_grad():
        adapted = tuned.model(**inputs).logits[:, -1]
        merge_adapters(tuned)
        merged = tuned.model(**inputs).logits[:, -1]
        original = toy.model(**inputs).logits[:, -1]
    assert not hasattr(tuned.model.model.language_model, "merge_and_unload")  # a plain model now
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=0)
    changed = [n for n, p in toy.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed == [], f"merging the adapters changed the original model: {changed[:4]}"
    assert (original - merged).abs().max() > 1e-3  # the tuning did something the original lacks
    merge_adapters(toy)  # no adapters: nothing to do


def test_a_saved_lora_tune_is_its_adapters_and_loads_bit_for_bit(tmp_path, monkeypatch, caplog):
    """The study keeps a LoRA tune as its adapters alone (`experiments.kept.SavedModel`): loading
    them onto the run's model and merging gives the tuned model's logits exactly, trains nothing,
    leaves the original model and the global RNG as they were. A folder saved for another base
    model, or whose adapters file is missing or differs from the one saved, is trained again
    (with a warning naming the file), never used; adapters of the wrong shape are refused by name."""
    from defenses.finetune import FineTune
    from experiments.kept import ADAPTERS_FILE, SavedModel
    from probing import load_model
    from probing.datasets import toy as data
    from probing.errors import InputError
    from probing.render import encode, render_prompt
    from safetensors.torch import load_file, save_file

    toy = load_model("toy")
    base = {"model": "toy", "dtype": "float32"}
    before = {n: p.detach().clone() for n, p in toy.model.named_parameters()}
    folder = tmp_path / "models" / "mo_finetune"

    def saved(base=base):
        return SavedModel(inner=FineTune(params={"steps": 2}, steps=2, batch_size=2), folder=folder,
                          base_name=toy.name, base=base)

    fresh = saved().model(toy)
    assert sorted(f.name for f in folder.iterdir()) == [ADAPTERS_FILE, "mechprobe.json"]
    model_bytes = sum(p.numel() * p.element_size() for p in toy.model.parameters())
    assert (folder / ADAPTERS_FILE).stat().st_size < 0.05 * model_bytes

    real_tune, calls = FineTune._tune, []
    monkeypatch.setattr(FineTune, "_tune", lambda self, bundle: calls.append(1) or real_tune(self, bundle))
    rng = torch.get_rng_state()
    loaded = saved().model(toy)
    assert calls == [] and torch.equal(torch.get_rng_state(), rng)
    queries = data.requests("test")[:6]
    inputs = encode(toy, [render_prompt(toy.processor, q) for q in queries], [q.load_image() for q in queries])
    with torch.no_grad():
        a, b = fresh.model(**inputs).logits[:, -1], loaded.model(**inputs).logits[:, -1]
        original = toy.model(**inputs).logits[:, -1]
    assert torch.equal(a, b), f"loaded tune differs from the trained one by {(a - b).abs().max():.3g}"
    assert (original - a).abs().max() > 1e-4  # the tune did something
    assert [n for n, p in toy.model.named_parameters() if not torch.equal(p, before[n])] == []

    saved(base={**base, "dtype": "bfloat16"}).model(toy)  # saved for another base: trained again
    assert calls == [1]
    tensors = load_file(str(folder / ADAPTERS_FILE))
    with caplog.at_level("WARNING"):
        save_file({k: torch.zeros_like(v) for k, v in tensors.items()}, str(folder / ADAPTERS_FILE))
        saved(base={**base, "dtype": "bfloat16"}).model(toy)  # same names, other values: sha256 mismatch
        (folder / ADAPTERS_FILE).unlink()
        saved(base={**base, "dtype": "bfloat16"}).model(toy)
    assert calls == [1, 1, 1]
    assert [r.getMessage() for r in caplog.records if "cannot be loaded" in r.getMessage()] and \
        all(str(folder) in r.getMessage() for r in caplog.records if "cannot be loaded" in r.getMessage())

    tune = FineTune(params={"steps": 2}, steps=2, batch_size=2)
    dropped = sorted(tensors)[0]
    with pytest.raises(InputError, match=re.escape(dropped)):
        tune.from_adapters(toy, {k: v for k, v in tensors.items() if k != dropped})
    with pytest.raises(InputError, match=re.escape(f"{dropped} is [")):
        tune.from_adapters(toy, {**tensors, dropped: torch.zeros(3, 3)})


def test_fine_tuning_examples_mask_exactly_the_prompt(tiny):
    """`encode_example` labels only the answer: the prompt's length comes from the tokenizer on the
    prompt with its image token expanded as in the full example (the image is processed once),
    and equals the processor's own count for the prompt alone (the former second processor call)."""
    from defenses.finetune import safety_examples
    from probing import PromptSpec, render_prompt
    from probing.training import IGNORE, encode_example

    examples = safety_examples(0)[:16]
    assert {e.query.has_image for e in examples} == {True, False}
    for e in examples:
        got = encode_example(tiny.processor, e)
        prompt = render_prompt(tiny.processor, e.query, PromptSpec(system_prompt=e.system))
        image = e.query.load_image()
        want = tiny.processor(text=[prompt], images=[image] if image is not None else None,
                              return_tensors="pt")["input_ids"].shape[1]
        n_masked = int((got["labels"] == IGNORE).sum())
        assert n_masked == want, e.query.id
        assert (got["labels"][want:] == got["input_ids"][want:]).all()
        assert (got["pixel_values"] is not None) == e.query.has_image


def test_get_defense_builds_an_expressions_members_with_the_callers_builder():
    """``member``: every single name of an expression comes from the caller (one instance per
    name there), with the registry's grammar: score-level operators bind looser than "+"."""
    from defenses import Compose, get_defense
    from defenses.composite import ScoreLevel

    built = {}

    def member(name):
        return built.setdefault(name, get_defense(name))

    d = get_defense("sr_self_reminder+qr_caption|sr_self_reminder", member=member)
    assert isinstance(d, ScoreLevel) and d.op == "|" and set(built) == {"sr_self_reminder", "qr_caption"}
    left, right = d.members
    assert isinstance(left, Compose) and left.members == [built["sr_self_reminder"], built["qr_caption"]]
    assert right is built["sr_self_reminder"] and left.members[0] is right  # one instance per name
    assert get_defense("sr_self_reminder", member=lambda n: "mine") == "mine"
    tuned = get_defense("ni_text_smooth", member=member, rate=0.2)  # parameters: built here, as without member
    assert tuned.params["rate"] == 0.2 and "ni_text_smooth" not in built


def test_the_answer_only_loss_equals_the_models_own_loss_and_gradients(tiny):
    """`probing.training.answer_loss` unembeds only the labelled positions (mo_finetune's step,
    issue 15); the loss and every gradient equal the HF model's own `model(**batch).loss`
    (`causal_lm_loss`: full-vocabulary logits at every position), on a batch with an image, a
    text-only example and right padding."""
    import copy

    from defenses.finetune import lora_copy, safety_examples
    from probing.training import answer_loss, causal_lm_loss, collate, encode_example

    examples = safety_examples(0)
    picked = [next(e for e in examples if e.query.has_image), next(e for e in examples if not e.query.has_image)]
    batch = collate([encode_example(tiny.processor, e) for e in picked], tiny.processor.tokenizer.pad_token_id)
    assert batch["attention_mask"].min() == 0  # the two differ in length: padding is in the batch
    model = lora_copy(copy.deepcopy(tiny.model))
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for loss_fn in (answer_loss, causal_lm_loss):
        model.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in params]))
    (ours, g_ours), (theirs, g_theirs) = grads
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-6)
    assert sum(int(g.abs().sum() > 0) for g in g_ours) >= len(g_ours) // 2  # LoRA's B matrices get gradients
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
