"""Prefix-shared condition sweeps equal independent passes."""

import pytest
import torch

from probing import PromptSpec, Query, RefusalScorer
from probing.sweep import plan_prefixes, score_conditions

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
