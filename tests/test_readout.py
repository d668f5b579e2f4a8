"""Readout token resolution against the real LLaVA-1.5 (Llama/Vicuna) tokenizer."""

import pytest
import torch

from probing.readout import (
    ResolvedReadout, first_answer_token, first_token_readout, get_readout, resolve_readout,
    yes_no_readout,
)


@pytest.fixture(scope="module")
def tok(processor):
    return processor.tokenizer


def test_first_answer_tokens_of_real_tokenizer(tok):
    assert first_answer_token(tok, "Sorry") == 8221
    assert first_answer_token(tok, "I") == 306
    assert first_answer_token(tok, "Sure") == 18585
    assert tok.convert_ids_to_tokens(8221) == "▁Sorry"


def test_multi_piece_words_resolve_to_first_piece(tok):
    # "Certainly" is three pieces; the model emits "▁C" first.
    cert = first_answer_token(tok, "Certainly")
    assert tok.convert_ids_to_tokens(cert) == "▁C"
    assert len(tok("ASSISTANT: Certainly", add_special_tokens=False).input_ids) - \
        len(tok("ASSISTANT:", add_special_tokens=False).input_ids) == 3
    # "1" is two pieces: a bare "▁" then "1"; the first one is what is read.
    assert tok.convert_ids_to_tokens(first_answer_token(tok, "1")) == "▁"


def test_default_readout_resolves_distinct_ids(tok):
    r = resolve_readout(first_token_readout(), tok)
    assert r.refusal_ids[:2] == (306, 8221)  # "I", "Sorry"
    assert 18585 in r.comply_ids
    assert len(set(r.token_ids)) == len(r.token_ids)


def test_yes_no_readout_ids(tok):
    r = resolve_readout(yes_no_readout(refusal_answer="No"), tok)
    assert r.refusal_ids == (1939,) and r.comply_ids == (3869,)
    r2 = resolve_readout(yes_no_readout(refusal_answer="Yes"), tok)
    assert r2.refusal_ids == (3869,)
    with pytest.raises(ValueError, match="refusal_answer"):
        yes_no_readout(refusal_answer="Maybe")


def test_colliding_words_are_rejected_by_name(tok):
    with pytest.raises(ValueError, match="I'm"):
        resolve_readout(first_token_readout(refusal_words=("I", "I'm")), tok)
    with pytest.raises(ValueError, match="Sure"):
        resolve_readout(first_token_readout(refusal_words=("Sure",), comply_words=("Sure", "Here")), tok)


def test_empty_words_are_rejected_by_name(tok):
    with pytest.raises(ValueError, match="resolve to no token"):
        resolve_readout(first_token_readout(refusal_words=("Sorry", "  ")), tok)
    with pytest.raises(ValueError, match="at least one"):
        resolve_readout(first_token_readout(comply_words=()), tok)


def test_unknown_readout_name():
    with pytest.raises(ValueError, match="first_token"):
        get_readout("vibes")


def test_margin_is_logsumexp_difference():
    r = ResolvedReadout(first_token_readout(), (1, 2), (3,))
    logits = torch.tensor([[0.5, -1.0, 2.0], [3.0, 1.0, 0.0]])
    want = torch.logsumexp(logits[:, :2], -1) - logits[:, 2]
    assert torch.allclose(r.margin(logits), want)
