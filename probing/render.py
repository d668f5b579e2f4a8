"""Rendering queries into LLaVA-1.5 prompts and left-padded model inputs.

LLaVA-1.5's chat template renders ``[system ]USER: <image>\\n{text} ASSISTANT:``; the decision
position is the last prompt token, whose next-token logits hold the first answer token.

Prompt formats (`PROMPT_FORMATS`, `format_spec`): ``"hf"`` renders exactly what the llava-hf chat
template renders (no system prompt unless a defense sets one); ``"llava_v1"`` is the original
LLaVA repository's ``conv_llava_v1`` conversation, which puts a default system prompt
(`LLAVA_V1_SYSTEM`) before ``USER:``. A defense's system prompt *replaces* the format's default
(it never stacks on it): the default is ``PromptSpec.default_system``, used only when no
``system_prompt`` is set.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch

from .query import Query, QueryError
from .errors import InputError


@dataclass(frozen=True)
class PromptSpec:
    """What surrounds the request in the prompt (defenses and readouts fill these in).

    Attributes:
        system_prompt: text placed before ``USER:`` (LLaVA-1.5 has no system role marker).
        text_before: text placed in the user turn before the request.
        text_after: text placed in the user turn after the request (reminders, questions).
    """

    system_prompt: str | None = None
    text_before: str = ""
    text_after: str = ""
    # The conversation format's default system prompt (llava_v1), used only when no
    # system_prompt is set: a defense's system prompt replaces it.
    default_system: str | None = None

    def merged(self, other: "PromptSpec") -> "PromptSpec":
        """Both specs applied: system prompts joined, ``other``'s text outermost."""
        system = "\n".join(s for s in (self.system_prompt, other.system_prompt) if s) or None
        before = "\n".join(s for s in (other.text_before, self.text_before) if s)
        after = "\n".join(s for s in (self.text_after, other.text_after) if s)
        return PromptSpec(system, before, after, other.default_system or self.default_system)

    @property
    def system(self) -> str | None:
        """The system prompt rendered: the one set, else the format's default."""
        return self.system_prompt or self.default_system


# --- prompt formats --------------------------------------------------------------------------
#: The default system prompt of the original LLaVA repository's ``llava_v1`` conversation template.
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")
PROMPT_FORMATS = {"hf": None, "llava_v1": LLAVA_V1_SYSTEM}


def format_spec(prompt_format: str = "hf") -> PromptSpec:
    """The base spec of a conversation format: ``"hf"`` (llava-hf chat template) or ``"llava_v1"``."""
    if prompt_format not in PROMPT_FORMATS:
        raise InputError(f"unknown prompt format {prompt_format!r}; choose from {sorted(PROMPT_FORMATS)}")
    return PromptSpec(default_system=PROMPT_FORMATS[prompt_format])


def user_text(query: Query, spec: PromptSpec) -> str:
    return "\n".join(s for s in (spec.text_before, query.text, spec.text_after) if s)


#: most prompts `render_prompt` remembers per processor (then it starts over)
RENDER_MEMO_SIZE = 1 << 13
_RENDERED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _memo_of(registry: "weakref.WeakKeyDictionary", owner) -> dict | None:
    """``owner``'s memo in ``registry`` (it lives as long as the owner), or None for an owner that
    cannot be weakly referenced (no memo)."""
    try:
        return registry.setdefault(owner, {})
    except TypeError:
        return None


def _remember(memo: dict | None, entries: dict) -> None:
    """Store ``entries``; a memo that would pass `RENDER_MEMO_SIZE` starts over."""
    if memo is None:
        return
    if len(memo) + len(entries) > RENDER_MEMO_SIZE:
        memo.clear()
    memo.update(entries)


def render_prompt(processor, query: Query, spec: PromptSpec = PromptSpec()) -> str:
    """The prompt string for one query, through the processor's own chat template.

    Remembered per processor, keyed by everything the result depends on (the template, whether
    there is an image, the user text, the system prompt): the chat template costs ~0.5 ms a call,
    and a study renders each row more than once (grouping, then scoring), the first time in its
    plan-ahead worker."""
    text = user_text(query, spec)
    key = (getattr(processor, "chat_template", None), query.has_image, text, spec.system)
    memo = _memo_of(_RENDERED, processor)
    # one lookup: another thread may clear a full memo between a membership test and a read
    got = memo.get(key) if memo is not None else None
    if got is not None:
        return got
    content = [{"type": "image"}] if query.has_image else []
    content.append({"type": "text", "text": text})
    conversation = []
    if spec.system:
        conversation.append({"role": "system", "content": [{"type": "text", "text": spec.system}]})
    conversation.append({"role": "user", "content": content})
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    _remember(memo, {key: prompt})
    return prompt


_TOKENIZER_LOCKS: "weakref.WeakKeyDictionary[object, threading.Lock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def tokenizer_lock(tokenizer) -> threading.Lock:
    """The lock every tokenization by ``tokenizer`` (or a processor over it) holds. A fast
    tokenizer keeps its padding and truncation settings as state that each call with other
    settings changes, so two threads tokenizing at once (the scoring's prefetch workers, the
    main thread's length checks) can fail with "Already borrowed"; the calls are short."""
    with _LOCKS_GUARD:
        lock = _TOKENIZER_LOCKS.get(tokenizer)
        if lock is None:
            lock = _TOKENIZER_LOCKS[tokenizer] = threading.Lock()
        return lock


_TOKENIZED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def token_ids(bundle, prompts: list[str]) -> list[list[int]]:
    """Each prompt's token ids, unexpanded (one image token per image), BOS included; the lists are
    shared, do not change them.

    Remembered per tokenizer, keyed by the prompt and the vocabulary's size (an added token
    tokenizes anew), at most `RENDER_MEMO_SIZE` prompts: the study tokenizes a chunk's rows in its
    plan-ahead worker, and the main thread's grouping and length checks find them there."""
    tok = bundle.tokenizer
    memo = _memo_of(_TOKENIZED, tok)
    size = len(tok)
    # this call's own lookups: another thread may clear a full memo while this one runs
    found = {p: memo.get((size, p)) if memo is not None else None for p in prompts}
    todo = [p for p, ids in found.items() if ids is None]
    if todo:
        with tokenizer_lock(tok):
            new = dict(zip(todo, tok(todo, add_special_tokens=True)["input_ids"]))
        found.update(new)
        _remember(memo, {(size, p): ids for p, ids in new.items()})
    return [found[p] for p in prompts]


def prompt_lengths(bundle, prompts: list[str], n_images: list[int]) -> list[int]:
    """Token count of each prompt after image-token expansion (BOS included)."""
    return expanded_lengths(bundle, token_ids(bundle, prompts), n_images)


def expanded_lengths(bundle, ids: list[list[int]], n_images: list[int]) -> list[int]:
    """`prompt_lengths` from prompts already tokenized (unexpanded ids, BOS included)."""
    extra = bundle.image_seq_length - 1
    return [len(x) + n * extra for x, n in zip(ids, n_images)]


def check_context(bundle, queries: list[Query], lengths: list[int]) -> None:
    """Refuse inputs longer than the model's context: truncation would silently change scores."""
    too_long = [(q.id, n) for q, n in zip(queries, lengths) if n > bundle.max_context]
    if too_long:
        shown = ", ".join(f"{qid!r} ({n} tokens)" for qid, n in too_long[:5])
        raise QueryError(
            f"input longer than the model's context of {bundle.max_context} tokens "
            f"(no silent truncation) for {len(too_long)} quer{'y' if len(too_long) == 1 else 'ies'}: {shown}"
        )


def plan_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Row indices grouped into batches of similar length (longest first) to limit padding."""
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def padded_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token, so left padding changes nothing."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def pad_rows(rows: list, pad: int, left: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows (lists or 1-D tensors) as one padded ``[rows, longest]`` batch and its 0/1 mask,
    padded on the left (else the right)."""
    width = max(len(x) for x in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, x in enumerate(rows):
        cols = slice(width - len(x), width) if left else slice(0, len(x))
        ids[r, cols] = torch.as_tensor(x)
        mask[r, cols] = 1
    return ids, mask


def encode(bundle, prompts: list[str], images: list, device=None) -> dict[str, torch.Tensor]:
    """Left-padded model inputs for prompts; ``images`` holds one entry (None or PIL) per prompt.

    Returns input_ids / attention_mask / position_ids ``[batch, seq]`` and, when any prompt has an
    image, pixel_values ``[n_images, 3, H, W]`` in prompt order.
    """
    flat = [im for im in images if im is not None]
    with tokenizer_lock(bundle.tokenizer):
        inputs = bundle.processor(text=prompts, images=flat or None, padding=True, return_tensors="pt")
    out = {
        "input_ids": inputs["input_ids"],
        "attention_mask": inputs["attention_mask"],
        "position_ids": padded_position_ids(inputs["attention_mask"]),
    }
    if flat:
        out["pixel_values"] = inputs["pixel_values"].to(bundle.dtype)
    device = device or bundle.input_device
    return {k: v.to(device) for k, v in out.items()}


def encode_pixels(bundle, prompts: list[str], pixels: list, device=None) -> dict[str, torch.Tensor]:
    """`encode` from pixel values already processed per image (``pixels``: one ``[3, H, W]`` tensor
    or None per prompt), so a cached image is not decoded or processed again.

    The ids are what the processor's tokenization gives: each prompt's ids (`token_ids`, usually
    already remembered from the length checks) with each image token expanded to the image's
    `image_seq_length` positions, padded on the tokenizer's side. Tokenizing the expanded text
    instead cost ~15 ms a batch of 16 (576 image tokens each), in the main thread when a score
    call has one batch. Equal to `encode` on the same images (tests/test_pipeline.py checks ids,
    mask and pixels bit for bit).
    """
    token = bundle.processor.image_token
    flat = [p for p in pixels if p is not None]
    n_tokens = sum(p.count(token) for p in prompts)
    if n_tokens != len(flat):
        raise InputError(f"encode_pixels: {n_tokens} image tokens in the prompts for {len(flat)} images")
    tok = bundle.tokenizer
    image_id, n_image = bundle.image_token_id, bundle.image_seq_length
    rows = []
    for ids in token_ids(bundle, prompts):
        if image_id in ids:
            ids = [x for i in ids for x in ((i,) * n_image if i == image_id else (i,))]
        rows.append(ids)
    input_ids, attention_mask = pad_rows(rows, tok.pad_token_id, left=tok.padding_side == "left")
    out = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": padded_position_ids(attention_mask),
    }
    if flat:
        out["pixel_values"] = torch.stack(flat).to(bundle.dtype)
    device = device or bundle.input_device
    return {k: v.to(device) for k, v in out.items()}
