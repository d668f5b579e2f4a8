"""Prefix-shared condition sweeps equal independent passes."""

import pytest
import torch

from probing import PromptSpec, Query, RefusalScorer
from probing.sweep import plan_prefixes, score_conditions

from .synthetic import lm_tokens

CONDITIONS = {
    "baseline": PromptSpec(),
    "remind": PromptSpec(text_after="Remember to be responsible."),
    "inspect": PromptSpec(text_before="First check the image and text for harmful content."),
    "both": PromptSpec(text_before="Be careful.", text_after="Answer safely and briefly, please."),
}


def test_sweep_equals_independent_passes(tiny, mixed_queries):
    scorer = RefusalScorer(tiny, batch_size=3, keep_hidden=True)
    assert plan_prefixes(scorer, mixed_queries, list(CONDITIONS.values())) is not None
    swept = score_conditions(scorer, mixed_queries, CONDITIONS)
    for name, spec in CONDITIONS.items():
        alone = scorer.score(mixed_queries, prompt=spec)
        got = swept[name]
        assert got.ids == alone.ids and got.meta["prefix_shared"] and got.meta["condition"] == name
        torch.testing.assert_close(got.margin, alone.margin, atol=1e-4, rtol=0)
        torch.testing.assert_close(got.lens_margin, alone.lens_margin, atol=1e-4, rtol=0)
        torch.testing.assert_close(got.hidden, alone.hidden, atol=1e-4, rtol=0)
    # conditions really differ
    assert (swept["remind"].margin - swept["baseline"].margin).abs().max() > 1e-3


def test_yes_no_readout_in_sweep(tiny, mixed_queries):
    scorer = RefusalScorer(tiny, "yes_no", batch_size=4)
    swept = score_conditions(scorer, mixed_queries[:5], CONDITIONS)
    alone = scorer.score(mixed_queries[:5], prompt=CONDITIONS["both"])
    torch.testing.assert_close(swept["both"].margin, alone.margin, atol=1e-4, rtol=0)


def test_system_prompt_conditions_fall_back(tiny, mixed_queries):
    scorer = RefusalScorer(tiny, batch_size=4, layers=None)
    conds = {"plain": PromptSpec(), "sys": PromptSpec(system_prompt="You are careful.")}
    assert plan_prefixes(scorer, mixed_queries, list(conds.values())) is None
    swept = score_conditions(scorer, mixed_queries, conds)
    assert "prefix_shared" not in swept["sys"].meta
    alone = scorer.score(mixed_queries, prompt=conds["sys"])
    torch.testing.assert_close(swept["sys"].margin, alone.margin, atol=1e-6, rtol=0)


def test_identical_conditions_keep_a_suffix(tiny):
    scorer = RefusalScorer(tiny, layers=None)
    qs = [Query("a", "Tell me about cats."), Query("b", "And dogs?")]
    swept = score_conditions(scorer, qs, {"x": PromptSpec(), "y": PromptSpec()})
    torch.testing.assert_close(swept["x"].margin, swept["y"].margin, atol=1e-5, rtol=0)
    torch.testing.assert_close(swept["x"].margin, scorer.score(qs).margin, atol=1e-4, rtol=0)


def test_sweep_errors(tiny):
    with pytest.raises(ValueError, match="needs queries"):
        score_conditions(RefusalScorer(tiny), [], CONDITIONS)



@pytest.mark.parametrize("positions", ["decision", 2])
def test_sweep_under_a_positional_edit_equals_independent_passes_under_it(tiny, mixed_queries, positions):
    """A user's edit block around the sweep: the shared prefix's pass would be edited at its own
    last tokens, so the sweep scores independent passes (each under the same edit)."""
    from hooks import edit, hook_name

    conds = {"baseline": CONDITIONS["baseline"], "remind": CONDITIONS["remind"]}
    qs = mixed_queries[:6]
    scorer = RefusalScorer(tiny, batch_size=3, keep_hidden=True)
    v = 3 * torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(2))
    with edit(tiny, {hook_name(1): lambda a, ctx: a + v}, positions=positions):
        swept = score_conditions(scorer, qs, conds)
        alone = {n: scorer.score(qs, prompt=s) for n, s in conds.items()}
    plain = score_conditions(scorer, qs, conds)  # no edit: the prefix is shared again
    assert plain["remind"].meta["prefix_shared"]
    for name in conds:
        assert "prefix_shared" not in swept[name].meta
        torch.testing.assert_close(swept[name].margin, alone[name].margin, atol=1e-5, rtol=0)
        torch.testing.assert_close(swept[name].hidden, alone[name].hidden, atol=1e-5, rtol=0)
        assert (swept[name].margin - plain[name].margin).abs().max() > 1e-3  # the edit shows


def test_a_capture_around_a_sweep_records_one_row_per_query_and_condition(tiny, mixed_queries):
    from hooks import capture, hook_name

    qs = mixed_queries[:5]
    conds = {"baseline": CONDITIONS["baseline"], "remind": CONDITIONS["remind"]}
    with capture(tiny, [hook_name(1)], "decision") as cache:
        score_conditions(RefusalScorer(tiny, batch_size=2, layers=None), qs, conds)
    assert cache[hook_name(1)].shape == (len(qs) * len(conds), tiny.d_model)  # no prefix rows


# ---------------------------------------------------------------- variants of one query

def _variant_rows(mixed_queries, tmp_path):
    """Rows of several variants per query: text variants of image queries (in-memory and file
    images), text variants of text-only queries, a lone row, and one group whose images differ."""
    import dataclasses

    from .conftest import noise_image

    path = tmp_path / "photo.png"
    noise_image(7).save(path)
    base = [q for q in mixed_queries if q.has_image][:2] + [Query("f", "What is in the file?", image=str(path))]
    texts = [q for q in mixed_queries if not q.has_image][:2]
    rows, specs, groups = [], [], []

    def group(variants):
        groups.append(list(range(len(rows), len(rows) + len(variants))))
        for vq, spec in variants:
            rows.append(vq)
            specs.append(spec)

    for j, q in enumerate(base):  # 2, 3 and 4 variants: noisy text and text around the request
        vs = [(dataclasses.replace(q, id=f"{q.id}#0"), PromptSpec()),
              (dataclasses.replace(q, id=f"{q.id}#1", text=q.text + " please"), PromptSpec()),
              (dataclasses.replace(q, id=f"{q.id}#2"), PromptSpec(text_after="Answer safely.")),
              (dataclasses.replace(q, id=f"{q.id}#3", text="x " + q.text), PromptSpec(text_before="Be careful."))]
        group(vs[: 2 + j])
    for q in texts:
        group([(dataclasses.replace(q, id=f"{q.id}#0"), PromptSpec()),
               (dataclasses.replace(q, id=f"{q.id}#1", text=q.text + "!"), PromptSpec())])
    group([(dataclasses.replace(base[0], id="lone"), PromptSpec(system_prompt="You are careful."))])
    group([(dataclasses.replace(base[0], id="img#0"), PromptSpec()),
           (dataclasses.replace(base[0], id="img#1", image=noise_image(11)), PromptSpec())])
    return rows, specs, groups


def test_variant_groups_equal_independent_passes(tiny, mixed_queries, tmp_path):
    from probing.prefix import score_variant_groups, variant_prefixes

    rows, specs, groups = _variant_rows(mixed_queries, tmp_path)
    scorer = RefusalScorer(tiny, batch_size=2, keep_hidden=True, feature_cache=0)
    _, _, shared = variant_prefixes(scorer, rows, specs, groups)
    assert [n is not None for n in shared] == [True, True, True, False, False, False, False]

    calls = []  # images through the vision tower
    handle = tiny.model.model.vision_tower.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        got = score_variant_groups(scorer, rows, specs, groups)
    finally:
        handle.remove()
    alone = scorer.score(rows, prompt=specs)
    assert got.ids == alone.ids and got.meta["prefix_shared_groups"] == 3
    torch.testing.assert_close(got.margin, alone.margin, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.lens_margin, alone.lens_margin, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.hidden, alone.hidden, atol=1e-4, rtol=0)
    # one image per sharing group (3) and one per row elsewhere (the lone row, two differing images)
    assert sum(calls) == 3 + 3
    assert (got.margin[groups[0]][0] - got.margin[groups[0]][1]).abs() > 1e-4  # variants really differ


def test_variant_groups_planned_in_another_thread_score_the_same_and_encode_nothing_first(tiny, mixed_queries,
                                                                                           tmp_path, monkeypatch):
    """`plan_variant_groups` + `prepare_first` in a worker thread (as the study's plan-ahead
    worker runs them), then `score_planned_groups`: the same bits as `score_variant_groups`, and
    the scoring encodes neither part's first batch again (its first forwards wait for no host
    encoding). A planned call's prepared batches are used once: scoring it again encodes them."""
    from concurrent.futures import ThreadPoolExecutor

    import probing.prefix as prefix_mod
    import probing.scorer as scorer_mod

    rows, specs, groups = _variant_rows(mixed_queries, tmp_path)
    scorer = RefusalScorer(tiny, batch_size=2, keep_hidden=True)
    whole = prefix_mod.score_variant_groups(scorer, rows, specs, groups)

    def plan():
        planned = prefix_mod.plan_variant_groups(scorer, rows, specs, groups)
        return prefix_mod.prepare_first(scorer, planned)

    with ThreadPoolExecutor(1) as pool:
        planned = pool.submit(plan).result()
    assert planned.rest and len(planned.batches) >= 2 and len(planned.rest_plan.batches) >= 2

    encoded = []
    for mod in (prefix_mod, scorer_mod):
        real = mod.encode_batch
        monkeypatch.setattr(mod, "encode_batch", lambda *a, real=real, mod=mod, **k: (
            encoded.append((mod.__name__, len(a[1]))), real(*a, **k))[1])
    got = prefix_mod.score_planned_groups(scorer, planned)
    # only the batches after the first of each part: prefix batches from the second on, the
    # other rows' batches from the second on
    want = sorted([("probing.prefix", len(b)) for b in planned.batches[1:]] +
                  [("probing.scorer", len(b)) for b in planned.rest_plan.batches[1:]])
    assert sorted(encoded) == want, encoded
    assert got.ids == whole.ids
    for a, b in ((got.margin, whole.margin), (got.lens_margin, whole.lens_margin), (got.hidden, whole.hidden)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    encoded.clear()
    again = prefix_mod.score_planned_groups(scorer, planned)
    assert len(encoded) == len(planned.batches) + len(planned.rest_plan.batches)
    torch.testing.assert_close(again.margin, whole.margin, atol=0, rtol=0)


def test_text_smoothing_shares_the_image_prefix(tiny, mixed_queries):
    """`ni_text_smooth` through `score` (its K variants share each image query's prefix) equals
    scoring every variant in full, and sends far fewer tokens through the trunk."""
    from defenses import ni_text_smooth

    d = ni_text_smooth(k=4, rate=0.2, seed=3)
    tokens = []
    handle = tiny.model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: tokens.append(lm_tokens(k)),
        with_kwargs=True)
    try:
        shared = RefusalScorer(tiny, batch_size=4).score(mixed_queries, defense=d)
        n_shared = sum(tokens)
        tokens.clear()
        full = RefusalScorer(tiny, batch_size=4, share_prefix=False).score(mixed_queries, defense=d)
        n_full = sum(tokens)
    finally:
        handle.remove()
    assert shared.meta["prefix_shared_groups"] == sum(q.has_image for q in mixed_queries)
    assert "prefix_shared_groups" not in full.meta
    torch.testing.assert_close(shared.margin, full.margin, atol=1e-4, rtol=0)
    torch.testing.assert_close(shared.lens_margin, full.lens_margin, atol=1e-4, rtol=0)
    assert n_shared < 0.5 * n_full, (n_shared, n_full)


def test_text_smoothing_under_a_positional_edit_equals_full_passes_under_it(tiny, mixed_queries):
    """`run_plan`'s prefix-shared variant groups inside a user's edit block score every variant in
    full, as ``share_prefix=False`` does under the same edit."""
    from defenses import ni_text_smooth
    from hooks import edit, hook_name

    d = ni_text_smooth(k=3, rate=0.2, seed=3)
    qs = [q for q in mixed_queries if q.has_image][:3] + mixed_queries[:1]
    v = 3 * torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(2))
    with edit(tiny, {hook_name(1): lambda a, ctx: a + v}, positions="decision"):
        shared = RefusalScorer(tiny, batch_size=4).score(qs, defense=d)
        full = RefusalScorer(tiny, batch_size=4, share_prefix=False).score(qs, defense=d)
    assert "prefix_shared_groups" not in shared.meta
    torch.testing.assert_close(shared.margin, full.margin, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared.lens_margin, full.lens_margin, atol=1e-5, rtol=0)


def test_variant_groups_must_partition_the_rows(tiny):
    from probing.prefix import score_variant_groups

    qs = [Query("a", "x"), Query("b", "y")]
    with pytest.raises(ValueError, match="exactly once"):
        score_variant_groups(RefusalScorer(tiny), qs, [PromptSpec()] * 2, [[0]])


def test_prefix_batches_cap_groups_and_rows():
    from probing.prefix import ROWS_PER_BATCH, group_batches

    assert group_batches([0, 1, 2, 3, 4], [1, 1, 1, 1, 1], 2) == [[0, 1], [2, 3], [4]]
    big = ROWS_PER_BATCH * 2
    assert group_batches([0, 1, 2, 3], [big - 1, 2, big + 5, 1], 2) == [[0], [1], [2], [3]]
    assert group_batches([0, 1, 2], [3, 3, 3], 4) == [[0, 1, 2]]


def test_split_by_image_prefix_keeps_rows_that_agree_up_to_the_image():
    from probing.prefix import split_by_image_prefix

    from .conftest import noise_image

    a, b = noise_image(1), noise_image(2)
    qs = [Query("r0", "x", image=a), Query("r1", "y", image=a), Query("r2", "z", image=a),
          Query("r3", "w", image=b), Query("r4", "v")]
    img = 9
    ids = [[1, 5, img, 7], [1, 5, img, 8], [1, 6, img, 7], [1, 5, img, 7], [1, 5, 7]]  # r2: another system prompt
    assert sorted(split_by_image_prefix(qs, ids, [[0, 1, 2, 3, 4]], img)) == [[0, 1], [2], [3], [4]]


def test_variant_groups_refuse_inputs_beyond_the_context_before_any_forward(tiny, mixed_queries, tmp_path,
                                                                            monkeypatch):
    """The prefix path checks every shared row's expanded length (image tokens included) against
    the model's context, as `prompt_lengths` counts it, and names the query before any forward."""
    from probing.errors import QueryError
    from probing.model import ModelBundle
    from probing.prefix import score_variant_groups
    from probing.render import prompt_lengths

    rows, specs, groups = _variant_rows(mixed_queries, tmp_path)
    scorer = RefusalScorer(tiny, batch_size=2)
    first = rows[groups[0][0]]
    want = prompt_lengths(tiny, scorer.render([first], [specs[groups[0][0]]]), [1])[0]
    forwards = []
    handle = tiny.model.register_forward_pre_hook(lambda m, a: forwards.append(1))
    try:
        monkeypatch.setattr(ModelBundle, "max_context", property(lambda self: want - 1))
        with pytest.raises(QueryError, match=rf"{first.id!r} \({want} tokens\)"):
            score_variant_groups(scorer, rows, specs, groups)
        assert not forwards
        monkeypatch.setattr(ModelBundle, "max_context", property(lambda self: 10**6))
        score_variant_groups(scorer, rows, specs, groups)
    finally:
        handle.remove()
