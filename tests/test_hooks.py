"""Hook capture and editing against HF output_hidden_states and inputs_embeds on a tiny LLaVA."""

import pytest
import torch

from hooks import Explicit, LastK, capture, edit, hook_name
from hooks.errors import HookError
from hooks.points import decoder_layers, parse_hook_name
from probing.render import encode

from .conftest import noise_image

PROMPTS = ["USER: Hi ASSISTANT:", "USER: <image>\nA somewhat longer question about it ASSISTANT:",
           "USER: A medium length question here ASSISTANT:"]


@pytest.fixture(scope="module")
def batch(tiny):
    return encode(tiny, PROMPTS, [None, noise_image(5), None])


def all_hook_counts(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def run(tiny, inputs, **kw):
    with torch.no_grad():
        return tiny.model(**inputs, use_cache=False, **kw)


def test_resid_pre_post_equal_output_hidden_states(tiny, batch):
    n = tiny.n_layers
    names = [hook_name(i, k) for i in range(n) for k in ("hook_resid_pre", "hook_resid_post")]
    with capture(tiny, names, "all") as cache:
        out = run(tiny, batch, output_hidden_states=True)
    hs = out.hidden_states
    for i in range(n):
        torch.testing.assert_close(cache[hook_name(i, "hook_resid_pre")], hs[i], atol=0, rtol=0)
        if i < n - 1:
            torch.testing.assert_close(cache[hook_name(i, "hook_resid_post")], hs[i + 1], atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(tiny.final_norm(cache[hook_name(n - 1)]), hs[-1], atol=1e-6, rtol=0)


def test_attn_and_mlp_out_decompose_the_residual(tiny, batch):
    i = 1
    names = [hook_name(i, k) for k in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post",
                                        "hook_attn_out", "hook_mlp_out")]
    with capture(tiny, names, "all") as c:
        run(tiny, batch)
    pre, mid, post = (c[hook_name(i, k)] for k in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post"))
    attn, mlp = c[hook_name(i, "hook_attn_out")], c[hook_name(i, "hook_mlp_out")]
    torch.testing.assert_close(pre + attn, mid, atol=1e-6, rtol=0)
    torch.testing.assert_close(mid + mlp, post, atol=1e-6, rtol=0)
    assert attn.abs().mean() > 1e-3 and mlp.abs().mean() > 1e-3


def test_positions_account_for_left_padding(tiny, batch):
    mask = batch["attention_mask"]
    with capture(tiny, [hook_name(2)], "all") as full:
        run(tiny, batch)
    all_pos = full[hook_name(2)]
    with capture(tiny, [hook_name(2)], "decision") as dec, \
         capture(tiny, [hook_name(2)], LastK(3)) as last3, \
         capture(tiny, [hook_name(2)], Explicit([[0, 1, -1]] * 3)) as expl:
        run(tiny, batch)
    assert dec[hook_name(2)].shape == (3, tiny.d_model)
    torch.testing.assert_close(dec[hook_name(2)], all_pos[:, -1], atol=0, rtol=0)
    torch.testing.assert_close(last3[hook_name(2)], all_pos[:, -3:], atol=0, rtol=0)
    for b in range(3):
        first = int(mask[b].argmax())
        want = all_pos[b, [first, first + 1, mask.shape[1] - 1]]
        torch.testing.assert_close(expl[hook_name(2)][b], want, atol=0, rtol=0)


def test_explicit_positions_match_the_unpadded_run(tiny, batch):
    """Relative index 0 is the row's own first token, as in a run of that prompt alone."""
    with capture(tiny, [hook_name(1)], Explicit([[0, 4]] * 3)) as batched:
        run(tiny, batch)
    alone = encode(tiny, PROMPTS[:1], [None])
    with capture(tiny, [hook_name(1)], "all") as single:
        run(tiny, alone)
    torch.testing.assert_close(batched[hook_name(1)][0], single[hook_name(1)][0, [0, 4]], atol=1e-5, rtol=0)


def test_decision_position_with_right_padding(tiny):
    tok = tiny.tokenizer
    tok.padding_side = "right"
    try:
        enc = tok(PROMPTS[::2], padding=True, return_tensors="pt")
    finally:
        tok.padding_side = "left"
    assert enc["attention_mask"][0, -1] == 0  # the short row is padded on the right
    with capture(tiny, [hook_name(0)], "decision") as c:
        run(tiny, dict(enc))
    alone = tok(PROMPTS[:1], return_tensors="pt")
    with capture(tiny, [hook_name(0)], "decision") as ref:
        run(tiny, dict(alone))
    torch.testing.assert_close(c[hook_name(0)][0], ref[hook_name(0)][0], atol=1e-5, rtol=0)


def test_hooks_removed_after_exit_and_after_exceptions(tiny, batch):
    before = all_hook_counts(tiny.model)
    with capture(tiny, [hook_name(0), hook_name(1, "hook_attn_out")]):
        assert all_hook_counts(tiny.model) > before
        run(tiny, batch)
    assert all_hook_counts(tiny.model) == before
    with pytest.raises(RuntimeError, match="boom"):
        with capture(tiny, [hook_name(0)]), edit(tiny, {hook_name(1): lambda a, c: a}):
            raise RuntimeError("boom")
    assert all_hook_counts(tiny.model) == before
    with pytest.raises(ValueError, match="must return a tensor of shape"):
        with edit(tiny, {hook_name(1): lambda a, c: a[:, :1]}):
            run(tiny, batch)
    assert all_hook_counts(tiny.model) == before


def test_edit_resid_pre_equals_shifted_input_embeddings(tiny):
    """Adding v to blocks.0.hook_resid_pre everywhere == feeding inputs_embeds + v."""
    enc = encode(tiny, PROMPTS[::2], [None, None])
    v = torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(0))
    with edit(tiny, {hook_name(0, "hook_resid_pre"): lambda a, ctx: a + v}):
        edited = run(tiny, enc).logits
    embeds = tiny.model.get_input_embeddings()(enc["input_ids"]) + v
    ref = run(tiny, {"inputs_embeds": embeds, "attention_mask": enc["attention_mask"],
                     "position_ids": enc["position_ids"]}).logits
    plain = run(tiny, enc).logits
    torch.testing.assert_close(edited, ref, atol=1e-5, rtol=0)
    assert (edited - plain).abs().max() > 1e-2


def test_edit_at_decision_position_only(tiny, batch):
    n = tiny.n_layers
    v = torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(1))
    with capture(tiny, [hook_name(n - 1)], "decision") as c:
        plain = run(tiny, batch).logits
    seen = {}

    def add_v(act, ctx):
        seen["shape"], seen["layer"] = act.shape, ctx.layer
        return act + v

    with edit(tiny, {hook_name(n - 1): add_v}, positions="decision"):
        edited = run(tiny, batch).logits
    assert seen == {"shape": (3, tiny.d_model), "layer": n - 1}
    with torch.no_grad():
        want_last = tiny.model.lm_head(tiny.final_norm(c[hook_name(n - 1)] + v))
    torch.testing.assert_close(edited[:, -1], want_last, atol=1e-5, rtol=0)
    torch.testing.assert_close(edited[:, :-1], plain[:, :-1], atol=0, rtol=0)


def test_bad_hook_names():
    with pytest.raises(ValueError, match="unknown hook point"):
        parse_hook_name("blocks.0.hook_nope", 4)
    with pytest.raises(ValueError, match="out of range"):
        parse_hook_name("blocks.9.hook_resid_post", 4)
    with pytest.raises(ValueError, match="fewer than"):
        LastK(50).index(torch.tensor([[0, 1, 1]]), 1, 3, "cpu")


def test_decoder_layers_found_on_bundle_and_hf_model(tiny):
    assert decoder_layers(tiny) is decoder_layers(tiny.model)


class _TupleLayer(torch.nn.Module):
    """A decoder layer in the style of older transformers: returns (hidden, extra)."""

    def __init__(self, d):
        super().__init__()
        self.lin = torch.nn.Linear(d, d)
        self.self_attn = torch.nn.Identity()
        self.mlp = torch.nn.Identity()
        self.post_attention_layernorm = torch.nn.Identity()

    def forward(self, hidden_states, attention_mask=None):
        return (hidden_states + self.lin(hidden_states), None)


class _TupleModel(torch.nn.Module):
    def __init__(self, d=8, n=2):
        super().__init__()
        self.layers = torch.nn.ModuleList(_TupleLayer(d) for _ in range(n))

    def forward(self, x, attention_mask=None):
        for layer in self.layers:
            x = layer(x, attention_mask=attention_mask)[0]
        return x


def test_layers_returning_tuples_work_for_capture_and_edit():
    torch.manual_seed(0)
    model = _TupleModel()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        h0 = model.layers[0](x)[0]
        plain = model(x)
        with capture(model, [hook_name(0)], "all") as c:
            model(x)
        torch.testing.assert_close(c[hook_name(0)], h0)
        with edit(model, {hook_name(0): lambda a, ctx: a * 0}):
            zeroed = model(x)
        torch.testing.assert_close(zeroed, model.layers[1](torch.zeros_like(x))[0])
        torch.testing.assert_close(model(x), plain)  # edit gone


def _plain_resid_post(tiny, inputs, layer):
    """Layer ``layer``'s output for ``inputs`` through a raw torch hook (no mechprobe hook)."""
    got = {}
    handle = tiny.layers[layer].register_forward_hook(lambda m, a, o: got.__setitem__("h", o[0] if isinstance(o, tuple)
                                                                                       else o))
    try:
        run(tiny, inputs)
    finally:
        handle.remove()
    return got["h"]


def test_a_capture_sees_edits_entered_inside_it_and_edits_run_in_block_order(tiny, batch):
    name = hook_name(1)
    plain = _plain_resid_post(tiny, batch, 1)
    v = torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(4))
    # the capture is entered first; the edits after it at the same point still run before it
    with capture(tiny, [name], "all") as c, edit(tiny, {name: lambda a, ctx: 2 * a}), \
            edit(tiny, {name: lambda a, ctx: a + v}):
        run(tiny, batch)
    torch.testing.assert_close(c[name], 2 * plain + v, atol=1e-5, rtol=0)  # outer edit first, then inner
    # resid_pre (a pre-hook) follows the same rule
    pre = hook_name(2, "hook_resid_pre")
    with capture(tiny, [pre], "decision") as c2, edit(tiny, {pre: lambda a, ctx: a + v}, positions="decision"):
        run(tiny, batch)
    torch.testing.assert_close(c2[pre], _plain_resid_post(tiny, batch, 1)[:, -1] + v, atol=1e-5, rtol=0)


def test_output_hidden_states_see_edits(tiny, batch):
    """transformers 5 records hidden states with hooks of its own, installed on the first forward
    that asks for them: an edit registered later still runs before them."""
    run(tiny, batch, output_hidden_states=True)  # transformers' recording hooks are in place now
    v = torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(5))
    plain = _plain_resid_post(tiny, batch, 1)
    with edit(tiny, {hook_name(1): lambda a, ctx: a + v}):
        hs = run(tiny, batch, output_hidden_states=True).hidden_states
    torch.testing.assert_close(hs[2], plain + v, atol=1e-5, rtol=0)


def test_the_scorers_held_hooks_see_a_defenses_edit(tiny, mixed_queries):
    """`holding_hooks` entered before a plan's edit at the same layer: the hidden states still hold
    the edited residual, as they do when the scorer registers its hooks itself."""
    from probing import PromptSpec, RefusalScorer
    from probing.plan import ScoringPlan

    qs = mixed_queries[:4]
    v = torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(6))
    plan = ScoringPlan("add", [[(q, PromptSpec())] for q in qs], edits={hook_name(1): lambda a, ctx: a + v})
    scorer = RefusalScorer(tiny, keep_hidden=True, progress=False)
    free = scorer.score(qs, defense=plan)
    with scorer.holding_hooks():
        held = scorer.score(qs, defense=plan)
    assert (free.hidden[:, 1] - scorer.score(qs).hidden[:, 1]).abs().max() > 1e-2  # the edit shows
    torch.testing.assert_close(held.hidden, free.hidden, atol=0, rtol=0)


def test_hook_arguments_are_checked(tiny, batch):
    name = hook_name(1)
    with capture(tiny, name) as c:  # one name, not its characters
        run(tiny, batch)
    assert c[name].shape == (3, tiny.d_model)
    with pytest.raises(HookError, match=r"edit: edits must be a dict"):
        with edit(tiny, [name]):
            pass
    with pytest.raises(HookError, match=r"must be a function"):
        with edit(tiny, {name: 3}):
            pass
    with pytest.raises(HookError, match=r"hook names must be strings"):
        with capture(tiny, [1]):
            pass


def test_forwards_of_different_lengths_are_not_joined(tiny, batch):
    name = hook_name(0)
    short = encode(tiny, PROMPTS[:1], [None])
    with capture(tiny, [name], "all") as c:
        run(tiny, batch)
        run(tiny, short)
    with pytest.raises(HookError, match=r"different shapes.*cache.calls"):
        c[name]
    assert [x.shape[1] for x in c.calls[name]] == [batch["input_ids"].shape[1], short["input_ids"].shape[1]]


def test_layer_hooks_lists_only_foreign_hooks(tiny, batch):
    from hooks.points import layer_hooks

    run(tiny, batch, output_hidden_states=True)  # transformers' own (inert) recording hooks
    assert layer_hooks(tiny) == []
    with edit(tiny, {hook_name(2, "hook_mlp_out"): lambda a, ctx: a}):
        assert layer_hooks(tiny) == ["layers.2.mlp (forward hook)"]
    handle = tiny.layers[0].register_forward_pre_hook(lambda m, a: None)
    try:
        assert layer_hooks(tiny) == ["layers.0 (forward pre-hook)"]
        assert layer_hooks(tiny, exclude={handle.id}) == []
    finally:
        handle.remove()
