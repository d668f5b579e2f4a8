"""Greedy generation: the one routine that lets the model answer (captions, intentions, rewrites,
the generation cross-check of the readout, the toy's caption target)."""

from __future__ import annotations

from typing import Sequence

import torch

from .query import Query
from .render import PromptSpec, encode, render_prompt


@torch.inference_mode()
def generate(bundle, queries: Sequence[Query], max_new_tokens: int = 32, batch_size: int = 16,
             prompt: PromptSpec = PromptSpec()) -> list[str]:
    """Greedy answers to ``queries`` (batched, left-padded), special tokens stripped, in input order."""
    tok = bundle.processor.tokenizer
    out: list[str] = []
    queries = list(queries)
    for start in range(0, len(queries), batch_size):
        chunk = queries[start:start + batch_size]
        prompts = [render_prompt(bundle.processor, q, prompt) for q in chunk]
        inputs = encode(bundle, prompts, [q.load_image() for q in chunk])
        inputs.pop("position_ids")  # generate derives them from the mask
        ids = bundle.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tok.pad_token_id)
        out += [t.strip() for t in tok.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)]
    return out
