"""Greedy decoding with a static cache (`probing.decode`): the same tokens as transformers'
`generate`, with and without an end-of-sequence token; on the CPU `generate` keeps transformers'.

The CUDA-graph replay itself needs a GPU (benchmarks/gpu_study.py checks it there against the
same loop run eagerly and against `generate`); here the eager step it captures is checked."""

import copy

import pytest
import torch

import probing.generation as generation_mod
from probing import PromptSpec
from probing.decode import greedy_decode
from probing.errors import InputError
from probing.pipeline import process_image
from probing.render import encode_pixels, render_prompt


def _inputs(bundle, queries):
    prompts = [render_prompt(bundle.processor, q, PromptSpec()) for q in queries]
    pixels = [process_image(bundle, q.load_image()) if q.has_image else None for q in queries]
    return encode_pixels(bundle, prompts, pixels)


def _generate(bundle, inputs, n, **kwargs):
    plain = {k: v for k, v in inputs.items() if k != "position_ids"}
    ids = bundle.model.generate(**plain, max_new_tokens=n, do_sample=False,
                                pad_token_id=bundle.tokenizer.pad_token_id, **kwargs)
    return ids[:, inputs["input_ids"].shape[1]:]


@pytest.mark.parametrize("cache", [None, "static"])
def test_same_tokens_as_generate(tiny, mixed_queries, cache):
    """Left-padded rows with and without images, against `generate` with transformers' default
    (dynamic) cache and with its static cache."""
    inputs = _inputs(tiny, mixed_queries[:6])
    assert not inputs["attention_mask"].all(), "the batch should be padded"
    with torch.inference_mode():
        want = _generate(tiny, inputs, 10, **({"cache_implementation": cache} if cache else {}))
    got = greedy_decode(tiny.model, inputs, 10, tiny.tokenizer.pad_token_id)
    assert not got.graphed
    assert got.tokens.shape == want.shape
    assert torch.equal(got.tokens, want), f"first differing row: {(got.tokens != want).any(1).nonzero()[0].item()}"


@pytest.mark.parametrize("check_every", [1, 3])
def test_rows_that_end_are_padded_as_generate_pads_them(tiny, mixed_queries, check_every):
    """An end token that some rows produce mid-way (taken from an unrestricted run): those rows
    continue with pad, and decoding stops once every row has ended (seen every ``check_every``
    steps, so extra columns are pad only)."""
    inputs = _inputs(tiny, mixed_queries[:4])
    pad = tiny.tokenizer.pad_token_id
    free = greedy_decode(tiny.model, inputs, 12, pad, eos_token_id=[]).tokens
    eos = int(free[0, 3])
    with torch.inference_mode():
        want = _generate(tiny, inputs, 12, eos_token_id=eos)
    got = greedy_decode(tiny.model, inputs, 12, pad, eos_token_id=eos, check_every=check_every).tokens
    assert (want[0, 4:] == pad).all(), "row 0 should have ended at its end token"
    width = want.shape[1]
    assert torch.equal(got[:, :width], want)
    assert (got[:, width:] == pad).all()
    if (want == eos).any(1).all():  # every row ended: no more than check_every - 1 columns past generate's
        assert got.shape[1] < width + check_every


def test_one_new_token_is_the_prefill_argmax(tiny, mixed_queries):
    inputs = _inputs(tiny, mixed_queries[:3])
    with torch.inference_mode():
        want = _generate(tiny, inputs, 1)
    assert torch.equal(greedy_decode(tiny.model, inputs, 1, tiny.tokenizer.pad_token_id).tokens, want)


def test_generate_decodes_through_transformers_on_the_cpu(tiny, mixed_queries, monkeypatch):
    """The graph path is for CUDA devices only; on the CPU `generate` is transformers' own."""
    def refuse(*a, **k):
        raise AssertionError("greedy_decode called on the CPU")

    monkeypatch.setattr(generation_mod, "greedy_decode", refuse)
    texts = generation_mod.generate(tiny, mixed_queries[:2], max_new_tokens=3)
    assert len(texts) == 2


def test_a_generation_config_beyond_plain_greedy_is_left_to_transformers(tiny):
    """A checkpoint's repetition penalty (or any field that adds a logits processor) would make
    `greedy_decode` differ from `generate`: it is named, and `generate` keeps transformers'."""
    from probing.decode import greedy_obstacle

    config = tiny.model.generation_config
    assert greedy_obstacle(config) is None, "the LLaVA config is plain greedy"
    for field, value in [("repetition_penalty", 1.2), ("no_repeat_ngram_size", 3), ("min_new_tokens", 2),
                         ("suppress_tokens", [5]), ("num_beams", 2)]:
        changed = copy.deepcopy(config)
        setattr(changed, field, value)
        assert field in greedy_obstacle(changed)


def test_right_padding_is_refused(tiny, mixed_queries):
    inputs = _inputs(tiny, mixed_queries[:3])
    flipped = {k: v.flip(-1) for k, v in inputs.items() if k != "pixel_values"}
    flipped["pixel_values"] = inputs["pixel_values"]
    with pytest.raises(InputError, match="left padding"):
        greedy_decode(tiny.model, flipped, 2, tiny.tokenizer.pad_token_id)
