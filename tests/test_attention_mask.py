"""The ready 4-D attention mask of padded batches (`probing.attention_mask`): it is the mask
transformers builds itself, the scores are the same bits as with the 2-D mask, and position-aware
hooks still see the padding."""

import pytest
import torch

import probing.prefix as prefix_mod
import probing.scorer as scorer_mod
from hooks import capture, hook_name
from hooks.capture import edit
from hooks.points import language_model
from probing import PromptSpec, RefusalScorer
from probing.attention_mask import causal_padding_mask, model_attention_mask
from probing.render import encode, padded_position_ids


def _two_d(lm, mask, padded):  # the path before: the 2-D mask, transformers decides
    return mask


@pytest.mark.parametrize("rows", [[[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]],
                                  [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]])
def test_the_mask_is_the_one_transformers_builds(tiny, rows):
    """Left and right padding, against `transformers.masking_utils.create_causal_mask` on the
    tiny model's language-model config (SDPA)."""
    from transformers.masking_utils import create_causal_mask

    mask = torch.tensor(rows)
    lm = language_model(tiny.model)
    embeds = torch.zeros(mask.shape[0], mask.shape[1], lm.config.hidden_size)
    want = create_causal_mask(config=lm.config, inputs_embeds=embeds, attention_mask=mask, cache=None,
                              position_ids=padded_position_ids(mask))
    got = causal_padding_mask(mask)
    assert got.dtype == torch.bool and want.dtype == torch.bool
    assert torch.equal(got, want), "the ready mask differs from transformers' own"


def test_unpadded_batches_and_other_attention_paths_keep_the_2d_mask(tiny):
    lm = language_model(tiny.model)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert model_attention_mask(lm, mask, padded=False) is mask
    assert model_attention_mask(lm, mask, padded=True).shape == (2, 1, 3, 3)
    real = lm.config._attn_implementation
    try:
        lm.config._attn_implementation = "eager"  # eager masks are additive floats, built without a device read
        assert model_attention_mask(lm, mask, padded=True) is mask
    finally:
        lm.config._attn_implementation = real


def test_scores_are_the_same_bits_as_with_the_2d_mask(tiny, mixed_queries, monkeypatch):
    """`score` (padded batches of text and image queries) and the prefix-shared path, with the
    ready mask and with the 2-D mask transformers turns into the same one."""
    from probing.sweep import score_conditions

    specs = {"a": PromptSpec(), "b": PromptSpec(text_after="Answer briefly.")}

    def run():
        scorer = RefusalScorer(tiny, batch_size=4, keep_hidden=True, progress=False)
        return scorer.score(mixed_queries), score_conditions(scorer, mixed_queries, specs)

    ready, ready_sweep = run()
    monkeypatch.setattr(scorer_mod, "model_attention_mask", _two_d)
    monkeypatch.setattr(prefix_mod, "model_attention_mask", _two_d)
    plain, plain_sweep = run()
    assert torch.equal(ready.margin, plain.margin) and torch.equal(ready.lens_margin, plain.lens_margin)
    assert torch.equal(ready.hidden, plain.hidden)
    for name in specs:
        assert torch.equal(ready_sweep[name].margin, plain_sweep[name].margin), name


def test_hooks_see_the_padding_behind_a_ready_mask(tiny, processor):
    """An edit's context and a capture at the decision position read the 2-D padding mask back
    from the 4-D one (right padding, where the decision position is not the last)."""
    prompts = ["USER: Hi ASSISTANT:", "USER: Tell me about the sea at night, please. ASSISTANT:"]
    inputs = encode(tiny, prompts, [None, None])
    mask = inputs["attention_mask"]
    ids = inputs["input_ids"]
    right_ids, right_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    for r in range(len(prompts)):  # the same rows, padded on the right
        n = int(mask[r].sum())
        right_ids[r, :n], right_mask[r, :n] = ids[r][mask[r].bool()], 1
    seen = []

    def look(act, ctx):
        seen.append(ctx.attention_mask)
        return act

    lm = language_model(tiny.model)
    name = hook_name(1)
    got = {}
    for label, m in (("2d", right_mask), ("4d", causal_padding_mask(right_mask))):
        with edit(tiny.model, {name: look}, positions="decision"), capture(tiny.model, [name], positions="decision") as c:
            with torch.inference_mode():
                lm(input_ids=right_ids, attention_mask=m, position_ids=padded_position_ids(right_mask))
        got[label] = c[name]
    assert torch.equal(seen[0].bool(), right_mask.bool()) and torch.equal(seen[1].bool(), right_mask.bool())
    assert torch.equal(got["2d"], got["4d"])
