"""Prompts, image tokens and padding against the real LLaVA-1.5 processor."""

import torch

from probing import PromptSpec, Query, render_prompt
from probing.render import encode, padded_position_ids, plan_batches, prompt_lengths

from .conftest import noise_image
from .test_images import square_on_mean


def test_prompt_matches_llava_template(processor):
    q = Query("a", "How do I bake bread?", image=noise_image(0))
    assert render_prompt(processor, q) == "USER: <image>\nHow do I bake bread? ASSISTANT:"
    q_text = Query("b", "How do I bake bread?")
    assert render_prompt(processor, q_text) == "USER: How do I bake bread? ASSISTANT:"


def test_system_prompt_and_surrounding_text(processor):
    q = Query("a", "Help me.", image=noise_image(0))
    spec = PromptSpec(system_prompt="Be careful.", text_before="Context:", text_after="Think first.")
    assert render_prompt(processor, q, spec) == \
        "Be careful. USER: <image>\nContext:\nHelp me.\nThink first. ASSISTANT:"


def test_merged_specs_nest():
    inner = PromptSpec("S1", "b1", "a1")
    outer = PromptSpec("S2", "b2", "a2")
    m = inner.merged(outer)
    assert m == PromptSpec("S1\nS2", "b2\nb1", "a1\na2")


def test_576_image_tokens_and_pixels_match_processor(tiny, processor):
    img = noise_image(3, size=(500, 340))
    prompt = "USER: <image>\nWhat is this? ASSISTANT:"
    ours = encode(tiny, [prompt], [img])
    # the shipped processor on LLaVA-1.5's padded image: what "pad" (the default) gives
    ref = processor(text=prompt, images=square_on_mean(img, processor.image_processor.image_mean),
                    return_tensors="pt")
    assert int((ours["input_ids"] == 32000).sum()) == 576
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    assert torch.equal(ours["pixel_values"], ref["pixel_values"])
    assert ours["pixel_values"].shape == (1, 3, 336, 336)
    assert prompt_lengths(tiny, [prompt], [1]) == [ref["input_ids"].shape[1]]


def test_batch_is_left_padded_with_positions_from_first_token(tiny):
    prompts = ["USER: Hi ASSISTANT:", "USER: <image>\nA much longer question here ASSISTANT:"]
    enc = encode(tiny, prompts, [None, noise_image(1)])
    mask = enc["attention_mask"]
    assert mask[0, 0] == 0 and mask[0, -1] == 1  # short row padded on the left
    assert (enc["input_ids"][0][mask[0] == 0] == 32001).all()  # <pad>
    pos = enc["position_ids"]
    first_real = int(mask[0].argmax())
    assert pos[0, first_real] == 0 and pos[0, -1] == mask[0].sum() - 1
    assert torch.equal(pos[1], torch.arange(mask.shape[1]))
    assert torch.equal(padded_position_ids(torch.tensor([[0, 0, 1, 1]])), torch.tensor([[0, 0, 0, 1]]))


def test_plan_batches_sorts_by_length_and_covers_all():
    lengths = [5, 50, 7, 600, 8]
    batches = plan_batches(lengths, 2)
    assert batches == [[3, 1], [4, 2], [0]]
    assert sorted(i for b in batches for i in b) == list(range(5))


def test_remembered_prompts_equal_the_template_and_follow_its_changes(processor):
    """`render_prompt` remembers prompts per processor (the study renders rows twice): what it
    returns equals the chat template's own output, for every input it depends on, and a changed
    template is rendered anew."""
    import copy

    def direct(proc, q, spec):
        content = ([{"type": "image"}] if q.has_image else []) + [
            {"type": "text", "text": "\n".join(s for s in (spec.text_before, q.text, spec.text_after) if s)}]
        conv = ([{"role": "system", "content": [{"type": "text", "text": spec.system}]}] if spec.system else [])
        return proc.apply_chat_template(conv + [{"role": "user", "content": content}], add_generation_prompt=True)

    proc = copy.deepcopy(processor)
    cases = [(Query("a", "Same text"), PromptSpec()), (Query("b", "Same text", noise_image(1)), PromptSpec()),
             (Query("c", "Same text"), PromptSpec(system_prompt="Be safe.")),
             (Query("d", "Same text"), PromptSpec(text_after="Refuse harm.")),
             (Query("e", "Same text"), PromptSpec(default_system="Default."))]
    first = [render_prompt(proc, q, s) for q, s in cases]
    assert len(set(first)) == len(cases)  # every dependency changes the prompt
    assert [render_prompt(proc, q, s) for q, s in cases] == first == [direct(proc, q, s) for q, s in cases]
    proc.chat_template = "CHANGED " + proc.chat_template
    changed = render_prompt(proc, *cases[0])
    assert changed.startswith("CHANGED ") and changed == direct(proc, *cases[0])


def test_tokenization_holds_the_tokenizers_lock(tiny):
    """`encode`, `encode_pixels` and `token_ids` tokenize under `tokenizer_lock` (a fast tokenizer's
    padding state is shared: the study tokenizes in prefetch workers and the main thread at once),
    so a call waits while another thread holds the lock."""
    import threading

    from probing.render import encode_pixels, token_ids, tokenizer_lock

    def prompts(text):  # a new prompt each: token_ids remembers what it tokenized
        return [render_prompt(tiny.processor, Query("a", text), PromptSpec())]

    assert tokenizer_lock(tiny.tokenizer) is tokenizer_lock(tiny.processor.tokenizer)
    for call in (lambda: encode(tiny, prompts("Hello there"), [None]),
                 lambda: encode_pixels(tiny, prompts("Hello there, lock"), [None]),
                 lambda: token_ids(tiny, prompts("Hello there, locked"))):
        done = threading.Event()
        with tokenizer_lock(tiny.tokenizer):
            worker = threading.Thread(target=lambda: (call(), done.set()))
            worker.start()
            assert not done.wait(0.2)  # blocked on the lock
        worker.join(5)
        assert done.is_set()


def test_token_ids_are_the_tokenizers_and_remembered(tiny):
    """`token_ids` equals the tokenizer's own call (BOS included, image token unexpanded) and
    tokenizes each distinct prompt once."""
    from probing.render import token_ids

    prompts = [render_prompt(tiny.processor, Query(f"q{i}", f"Request number {i}", image=noise_image(0) if i % 2 else None),
                             PromptSpec()) for i in range(4)]
    prompts.append(prompts[0])  # a repeat within one call
    want = tiny.tokenizer(prompts, add_special_tokens=True)["input_ids"]
    calls = []
    real = type(tiny.tokenizer).__call__

    def counting(self, text, *a, **k):
        calls.append(list(text))
        return real(self, text, *a, **k)

    type(tiny.tokenizer).__call__ = counting
    try:
        assert token_ids(tiny, prompts) == want
        assert token_ids(tiny, prompts[1:3]) == want[1:3]
        assert calls == [prompts[:4]]  # once, each distinct prompt once
    finally:
        type(tiny.tokenizer).__call__ = real
