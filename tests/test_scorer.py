"""The fused scorer against plain transformers forwards on a tiny random LLaVA."""

import dataclasses

import pytest
import torch

from probing import PromptSpec, Query, RefusalScorer, ScoreTable
from probing.query import QueryError

ATOL = 1e-4


def plain_forward(bundle, scorer, query, **kwargs):
    """Independent reference: the query alone (no padding) through the full HF model."""
    prompt = scorer.render([query])[0]
    image = query.load_image()
    inputs = bundle.processor(text=prompt, images=image, return_tensors="pt")
    with torch.no_grad():
        return bundle.model(**inputs, **kwargs)


def ref_margin(scorer, logits):
    return scorer.resolved.margin(logits[..., scorer.resolved.token_ids])


def test_fused_margins_equal_full_forward(tiny, mixed_queries):
    scorer = RefusalScorer(tiny, batch_size=4)
    table = scorer.score(mixed_queries)
    assert table.ids == [q.id for q in mixed_queries]
    assert table.labels == [q.label for q in mixed_queries]
    want = torch.stack([ref_margin(scorer, plain_forward(tiny, scorer, q).logits[0, -1])
                        for q in mixed_queries])
    torch.testing.assert_close(table.margin, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(table.p_refuse, torch.sigmoid(want), atol=ATOL, rtol=0)
    # The scores are not degenerate: queries differ and images matter.
    assert table.margin.std() > 0.05


def test_images_change_the_score(tiny):
    scorer = RefusalScorer(tiny)
    from .conftest import noise_image
    t = scorer.score([Query("a", "What is this?", image=noise_image(0)),
                      Query("b", "What is this?", image=noise_image(1)),
                      Query("c", "What is this?")])
    assert len({round(float(m), 4) for m in t.margin}) == 3


def test_batch_invariance(tiny, mixed_queries):
    one = RefusalScorer(tiny, batch_size=1).score(mixed_queries)
    seven = RefusalScorer(tiny, batch_size=7).score(mixed_queries)
    torch.testing.assert_close(one.margin, seven.margin, atol=1e-5, rtol=0)
    torch.testing.assert_close(one.lens_margin, seven.lens_margin, atol=1e-5, rtol=0)


def test_lens_margins_and_hidden_equal_output_hidden_states(tiny, mixed_queries):
    scorer = RefusalScorer(tiny, batch_size=3, keep_hidden=True)
    table = scorer.score(mixed_queries)
    n_layers = tiny.n_layers
    assert table.layers == list(range(n_layers))
    assert table.hidden.shape == (len(mixed_queries), n_layers, tiny.d_model)
    norm, lm_head = tiny.final_norm, tiny.model.lm_head
    for row, q in enumerate(mixed_queries):
        hs = plain_forward(tiny, scorer, q, output_hidden_states=True).hidden_states
        # transformers returns the last layer's state after the final norm.
        states = [hs[i + 1][0, -1] for i in range(n_layers - 1)]
        with torch.no_grad():
            lens = [lm_head(norm(s)) for s in states] + [lm_head(hs[-1][0, -1])]
            torch.testing.assert_close(table.hidden[row, :-1], torch.stack(states), atol=ATOL, rtol=0)
            torch.testing.assert_close(norm(table.hidden[row, -1]), hs[-1][0, -1], atol=ATOL, rtol=0)
        want = ref_margin(scorer, torch.stack(lens))
        torch.testing.assert_close(table.lens_margin[row], want, atol=ATOL, rtol=0)
    # The last layer's lens margin is the output margin.
    torch.testing.assert_close(table.lens_margin[:, -1], table.margin, atol=1e-5, rtol=0)


def test_layer_subset_and_no_layers(tiny, mixed_queries):
    full = RefusalScorer(tiny).score(mixed_queries[:4])
    sub = RefusalScorer(tiny, layers=[0, -1]).score(mixed_queries[:4])
    assert sub.layers == [0, tiny.n_layers - 1]
    torch.testing.assert_close(sub.lens_margin, full.lens_margin[:, [0, -1]], atol=1e-6, rtol=0)
    none = RefusalScorer(tiny, layers=None).score(mixed_queries[:4])
    assert none.lens_margin.shape == (4, 0)
    torch.testing.assert_close(none.margin, full.margin, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="out of range"):
        RefusalScorer(tiny, layers=[99])


def test_yes_no_readout_appends_question(tiny):
    scorer = RefusalScorer(tiny, readout="yes_no")
    q = Query("a", "Tell me a joke.")
    prompt = scorer.render([q])[0]
    assert prompt.startswith("USER: Tell me a joke.\nWould you answer") and prompt.endswith("ASSISTANT:")
    table = scorer.score([q])
    out = plain_forward(tiny, scorer, q).logits[0, -1]
    want = out[1939] - out[3869]  # log P(No) - log P(Yes), up to the shared normaliser
    torch.testing.assert_close(table.margin[0], want, atol=ATOL, rtol=0)
    assert table.meta["readout"] == "yes_no"


def test_system_prompt_is_used(tiny):
    q = Query("a", "Tell me a joke.")
    plain = RefusalScorer(tiny).score([q])
    with_sys = RefusalScorer(tiny, prompt=PromptSpec(system_prompt="You are careful.")).score([q])
    assert abs(float(plain.margin[0] - with_sys.margin[0])) > 1e-4
    assert with_sys.meta["prompt"]["system_prompt"] == "You are careful."


def test_score_table_roundtrip(tiny, mixed_queries, tmp_path):
    table = RefusalScorer(tiny, keep_hidden=True).score(mixed_queries[:5], meta={"condition": "baseline"})
    table.save(tmp_path / "t")
    back = ScoreTable.load(tmp_path / "t")
    assert back.ids == table.ids and back.labels == table.labels and back.layers == table.layers
    assert torch.equal(back.margin, table.margin) and torch.equal(back.hidden, table.hidden)
    assert back.meta["condition"] == "baseline" and back.meta["refusal_ids"][1] == 8221
    sub = back.select(["q3", "q0"])
    assert sub.ids == ["q3", "q0"] and torch.equal(sub.margin, table.margin[[3, 0]])
    with pytest.raises(KeyError, match="nope"):
        back.select(["nope"])
    with pytest.raises(FileNotFoundError, match="not a ScoreTable"):
        ScoreTable.load(tmp_path)


# -- bad input ---------------------------------------------------------------------------------

def test_missing_image_file_names_query(tiny, tmp_path):
    q = Query("cat-17", "What is this?", image=tmp_path / "nope.jpg")
    with pytest.raises(QueryError, match=r"cat-17.*nope\.jpg"):
        RefusalScorer(tiny).score([Query("ok", "hi"), q])


def test_unreadable_image_names_query(tiny, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(QueryError, match=r"dog-3.*broken\.jpg"):
        RefusalScorer(tiny).score([Query("dog-3", "What is this?", image=bad)])


def test_query_without_text_or_image():
    with pytest.raises(QueryError, match="empty-1.*neither text nor image"):
        Query("empty-1", "   ")
    with pytest.raises(QueryError, match="label"):
        Query("x", "hi", label="spicy")


def test_too_long_input_is_refused_not_truncated(tiny):
    long_text = " ".join(["word"] * 5000)
    with pytest.raises(QueryError, match=r"4096.*long-1.*5009 tokens"):
        RefusalScorer(tiny).score([Query("short", "hi"), Query("long-1", long_text)])


def test_duplicate_ids_and_empty_input(tiny):
    with pytest.raises(QueryError, match="duplicate query id 'a'"):
        RefusalScorer(tiny).score([Query("a", "x"), Query("a", "y")])
    with pytest.raises(ValueError, match="no queries"):
        RefusalScorer(tiny).score([])
    with pytest.raises(ValueError, match="batch_size"):
        RefusalScorer(tiny, batch_size=0)


def test_readout_shortcuts_are_bit_identical():
    """The hot path's bmm is einsum's own call, and one margin over [output | layers] equals two."""
    from probing.scorer import lens_logits_of

    g = torch.Generator().manual_seed(0)
    for b, n_layers, t, n in [(1, 1, 2, 1), (3, 4, 9, 7), (8, 33, 9, 7), (16, 4, 2, 1), (5, 7, 12, 3)]:
        w = torch.randn(t, 64, generator=g)
        normed = torch.randn(b, n_layers, 64, generator=g) * 3
        final = torch.randn(b, 64, generator=g) * 3
        einsum = torch.einsum("bld,td->blt", normed, w)
        assert torch.equal(lens_logits_of(normed, w), einsum)

        def margin(x):
            return torch.logsumexp(x[..., :n], -1) - torch.logsumexp(x[..., n:], -1)

        both = margin(torch.cat([einsum, (final @ w.T)[:, None]], 1))
        assert torch.equal(both[:, -1], margin(final @ w.T)) and torch.equal(both[:, :-1], margin(einsum))


def test_left_padded_read_is_the_mask_read(tiny, mixed_queries):
    """`forward(left_padded=True)` (what `score` uses after checking each batch's mask) reads the
    last position without the mask: the same bits as the mask-derived decision index; captures are
    copies, never views that would keep a layer's whole output alive."""
    from probing.pipeline import encode_batch

    scorer = RefusalScorer(tiny, batch_size=4, keep_hidden=True)
    inputs = encode_batch(tiny, scorer.render(mixed_queries[:5]), mixed_queries[:5], scorer.pixel_cache)
    assert inputs["attention_mask"][:, -1].all() and not inputs["attention_mask"].all()  # padded, on the left
    slow = scorer.forward(inputs)
    with scorer.holding_hooks():
        fast = scorer.forward(inputs, left_padded=True)
        captured = list(scorer._reader._got)
    for a, b in zip(slow, fast):
        assert torch.equal(a, b)
    assert all(c._base is None for c in captured)
    assert scorer._reader.left_padded is False  # the promise holds for one forward only


def test_right_padded_batches_take_the_mask_read(tiny, mixed_queries):
    """A processor that pads on the right still scores each query as alone: `score` checks the
    mask and reads the decision position from it."""
    left = RefusalScorer(tiny, batch_size=4).score(mixed_queries)
    tok = tiny.tokenizer
    tok.padding_side = "right"
    try:
        scorer = RefusalScorer(tiny, batch_size=4)
        from probing.pipeline import encode_batch

        mask = encode_batch(tiny, scorer.render(mixed_queries[:4]), mixed_queries[:4], None)["attention_mask"]
        assert not mask[:, -1].all()  # the batches really are padded on the right
        right = scorer.score(mixed_queries)
    finally:
        tok.padding_side = "left"
    torch.testing.assert_close(right.margin, left.margin, atol=ATOL, rtol=0)
    torch.testing.assert_close(right.lens_margin, left.lens_margin, atol=ATOL, rtol=0)


def test_inputs_without_pixels_skip_the_llava_wrapper(tiny, mixed_queries):
    """A batch with no pixels (text only, or cached image features as ``inputs_embeds``) goes to
    the language model directly: the same bits as through `LlavaModel`, whose forward is not
    entered; a batch with pixels still goes through it (its vision tower)."""
    from probing.pipeline import encode_batch

    scorer = RefusalScorer(tiny, batch_size=4, keep_hidden=True)
    text = [q for q in mixed_queries if not q.has_image][:3]
    images = [q for q in mixed_queries if q.has_image][:2]
    wrapper_calls = []
    handle = tiny.model.model.register_forward_pre_hook(lambda m, a: wrapper_calls.append(1))
    try:
        for queries, wrapped in ((text, 0), (images, 1)):
            inputs = encode_batch(tiny, scorer.render(queries), queries, None)
            wrapper_calls.clear()
            margin, lens, hidden = scorer.forward(inputs)
            assert len(wrapper_calls) == wrapped, queries
            # the reference: LLaVA's own trunk, its final hidden state at the last position
            with torch.inference_mode():
                final = tiny.model.model(**inputs, use_cache=False).last_hidden_state[:, -1]
            want = scorer.resolved.margin(final.float() @ scorer._w_readout.T)
            assert torch.equal(margin, want), (margin - want).abs().max()
    finally:
        handle.remove()


def test_a_capture_around_score_is_put_in_table_order_by_the_plan(tiny, mixed_queries):
    """A `capture` records the scorer's forwards in batch order (sorted by length); the planned
    call's `in_table_order` gives table order, checked against each query alone through a raw
    torch hook on the full HF model."""
    from hooks import capture, hook_name

    scorer = RefusalScorer(tiny, batch_size=2, layers=None)
    name = hook_name(1, "hook_attn_out")
    planned = scorer.plan_score(mixed_queries)
    assert sorted(planned.order) == list(range(len(mixed_queries))) and planned.order != sorted(planned.order)
    with capture(tiny, [name], "decision") as cache:
        table = scorer.score(mixed_queries)
    got = planned.in_table_order(cache[name])
    want = []
    for q in mixed_queries:
        seen = {}
        handle = tiny.layers[1].self_attn.register_forward_hook(lambda m, a, o: seen.__setitem__("h", o[0][0, -1]))
        try:
            plain_forward(tiny, scorer, q)
        finally:
            handle.remove()
        want.append(seen["h"])
    assert table.ids == [q.id for q in mixed_queries]
    torch.testing.assert_close(got, torch.stack(want), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="one captured row per query"):
        planned.in_table_order(cache[name][:3])


def test_non_finite_scores_raise_naming_the_defense_condition_and_queries(tiny, mixed_queries):
    from hooks import hook_name
    from probing.errors import ScoringError
    from probing.plan import ScoringPlan
    from probing.sweep import score_conditions

    qs = mixed_queries[:4]
    scorer = RefusalScorer(tiny, batch_size=2)
    poison = ScoringPlan("poison", [[(q, PromptSpec())] for q in qs],
                         edits={hook_name(1): lambda a, ctx: a * float("nan")})
    with pytest.raises(ScoringError, match=rf"poison.*non-finite scores for 4 queries.*{qs[0].id!r}"):
        scorer.score(qs, defense=poison)
    weight = tiny.final_norm.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.fill_(float("inf"))
        with pytest.raises(ScoringError, match="non-finite scores"):
            scorer.score(qs)
        conds = {"plain": PromptSpec(), "remind": PromptSpec(text_after="Be careful.")}
        with pytest.raises(ScoringError, match=r"condition 'plain'.*non-finite scores"):
            score_conditions(scorer, qs, conds)  # the prefix-shared path
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert torch.isfinite(scorer.score(qs).margin).all()


def test_argument_mistakes_are_input_errors_naming_the_argument(tiny):
    from probing.errors import InputError

    assert RefusalScorer(tiny, layers=2).layers == [2]  # one layer index is one layer
    assert RefusalScorer(tiny, layers=-1).layers == [tiny.n_layers - 1]
    mistakes = (({"layers": "last"}, r"layers must be 'all', None"), ({"layers": [1.5]}, "layers must be an integer"),
                ({"layers": True}, "layers must be an integer"), ({"batch_size": "8"}, "batch_size must be an integer"),
                ({"batch_size": 2.5}, "batch_size must be an integer"), ({"prefetch": 1.0}, "prefetch must be"))
    for kwargs, match in mistakes:
        with pytest.raises(InputError, match=match):
            RefusalScorer(tiny, **kwargs)
    scorer = RefusalScorer(tiny, layers=None)
    q = Query("a", "hi")
    for queries, match in (("some text", "got str"), (q, "wrap one query in a list"),
                           ([q, "b"], "item 1 .* str, not a Query")):
        with pytest.raises(InputError, match=rf"score: .*{match}"):
            scorer.score(queries)
        with pytest.raises(InputError, match=match):
            scorer.score(queries, defense="sr_self_reminder")


def test_a_partitioned_plan_keeps_no_parts_own_record(tiny, mixed_queries):
    """Cross-fitted parts record their fold; the merged table must not claim the first part's fold
    for every query (the plan's own record says which query is in which fold)."""
    from probing.plan import ScoringPlan

    qs = mixed_queries[:5]
    parts = []
    for k in (0, 1):
        idx = [i for i in range(5) if i % 2 == k]
        parts.append((idx, ScoringPlan("p", [[(qs[i], PromptSpec())] for i in idx], record={"fold": k})))
    folds = {qs[i].id: i % 2 for i in range(5)}
    plan = ScoringPlan("p", parts=parts, record={"folds_by_id": folds})
    table = RefusalScorer(tiny, layers=None).score(qs, defense=plan)
    assert table.ids == [q.id for q in qs]
    assert "fold" not in table.meta and table.meta["folds_by_id"] == folds and table.meta["condition"] == "p"
    torch.testing.assert_close(table.margin, RefusalScorer(tiny, layers=None).score(qs).margin, atol=1e-5, rtol=0)


def test_a_score_level_ensemble_says_it_has_no_hidden_states(tiny, mixed_queries):
    import defenses  # noqa: F401  (registers the names)
    from probing.analysis import layer_profile
    from probing.errors import InputError

    qs = [dataclasses.replace(q, label="harmful" if i % 2 else "benign") for i, q in enumerate(mixed_queries[:8])]
    scorer = RefusalScorer(tiny, keep_hidden=True)
    baseline = scorer.score(qs)
    ens = scorer.score(qs, defense="sr_self_reminder|sr_mmsafety")
    assert ens.hidden is None and ens.meta["score_level"] == "max"
    with pytest.raises(InputError, match=r"'sr_self_reminder\|sr_mmsafety' is a score-level ensemble.*score='lens'"):
        layer_profile(baseline, ens, "probe")
    assert len(layer_profile(baseline, ens, "lens", n_boot=20).rows()) == tiny.n_layers
