"""Greedy generation: the one routine that lets the model answer (captions, intentions, rewrites,
the generation cross-check of the readout, the toy's caption target).

Two context managers let a caller steer it without threading arguments through every defense:

`generation_batch`
    the batch size `generate` uses when its caller names none (the study generates a whole run's
    captions up front in batches fitted to the device's memory, `fit_generation_batch`: on a GPU a
    decode step is launch-bound, so fewer, larger batches finish in fewer steps), and optionally a
    `probing.pipeline.PixelCache` its images are taken from and stored in (the study's, so the
    scoring does not process the same images again).
`generation_forbidden`
    within the block `generate` raises `GenerationNeeded` instead of running the model: the study
    builds the next chunk's plans in a worker thread while the model scores the current one, and
    the model (its hooks, caches) must not be entered from two threads at once.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Sequence

import torch

from .decode import graph_obstacle, greedy_decode, greedy_obstacle
from .errors import GenerationNeeded, InputError
from .pipeline import PixelCache, image_pixels, map_threads, pixel_threads, process_image
from .query import Query
from .render import PromptSpec, encode_pixels, render_prompt

#: the batch size of `generate` when neither its caller nor `generation_batch` names one
DEFAULT_GENERATION_BATCH = 16
#: the largest batch `fit_generation_batch` proposes
MAX_GENERATION_BATCH = 128

_BATCH: contextvars.ContextVar[int | None] = contextvars.ContextVar("mechprobe_generation_batch", default=None)
_PIXELS: contextvars.ContextVar[PixelCache | None] = contextvars.ContextVar("mechprobe_generation_pixels",
                                                                          default=None)
_FORBIDDEN: contextvars.ContextVar[str | None] = contextvars.ContextVar("mechprobe_generation_forbidden",
                                                                        default=None)


@contextlib.contextmanager
def generation_batch(n: int, pixel_cache: PixelCache | None = None) -> Iterator[None]:
    """`generate` calls in the block that name no batch size use ``n``; with ``pixel_cache``, they
    take their images' pixel values from it and store those they process there."""
    if not isinstance(n, int) or n < 1:
        raise InputError(f"generation batch size must be an integer >= 1, got {n!r}")
    token, token_pixels = _BATCH.set(n), _PIXELS.set(pixel_cache)
    try:
        yield
    finally:
        _PIXELS.reset(token_pixels)
        _BATCH.reset(token)


@contextlib.contextmanager
def generation_forbidden(why: str) -> Iterator[None]:
    """`generate` calls in the block (this thread or task only) raise `GenerationNeeded` naming ``why``."""
    token = _FORBIDDEN.set(why)
    try:
        yield
    finally:
        _FORBIDDEN.reset(token)


def fit_generation_batch(bundle, prompt_tokens: int, max_new_tokens: int, n_queries: int,
                         share: float = 0.5) -> int:
    """A generation batch for ``n_queries`` prompts of about ``prompt_tokens`` tokens on ``bundle``'s
    device: on CUDA, as many sequences as fit in ``share`` of the free memory (the KV cache of
    every layer at full length, and as much again for the prefill's activations), at most
    `MAX_GENERATION_BATCH`, evened out over the batches it takes (100 prompts at a limit of 64 run
    as two batches of 50); elsewhere `DEFAULT_GENERATION_BATCH` (a CPU forward is compute-bound,
    larger batches gain nothing)."""
    device = torch.device(bundle.input_device)
    if device.type != "cuda" or n_queries < 1:
        return DEFAULT_GENERATION_BATCH
    cfg = getattr(bundle.model.config, "text_config", bundle.model.config)
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    item = torch.empty((), dtype=bundle.dtype).element_size()
    per_sequence = 2 * 2 * cfg.num_hidden_layers * (prompt_tokens + max_new_tokens) * heads * head_dim * item
    free, _ = torch.cuda.mem_get_info(device)
    limit = max(1, min(MAX_GENERATION_BATCH, int(share * free // per_sequence)))
    batches = -(-n_queries // limit)
    return -(-n_queries // batches)


def _pixels(bundle, query: Query, cache: PixelCache | None) -> torch.Tensor | None:
    """A query's pixel values: from ``cache`` (or processed and stored there), else processed."""
    if not query.has_image:
        return None
    if cache is None:
        return process_image(bundle, query.load_image())
    return image_pixels(bundle, query, cache)[1]


@torch.inference_mode()
def generate(bundle, queries: Sequence[Query], max_new_tokens: int = 32, batch_size: int | None = None,
             prompt: PromptSpec = PromptSpec()) -> list[str]:
    """Greedy answers to ``queries`` (batched, left-padded), special tokens stripped, in input order.

    ``batch_size``: None takes `generation_batch`'s, else `DEFAULT_GENERATION_BATCH`.

    On a CUDA device, a model without hooks decodes through `probing.decode.greedy_decode`, each
    step one replayed CUDA graph; otherwise (CPU, hooks, a compiled or split model, a generation
    config that adds logits processors such as a repetition penalty) through transformers'
    `generate`."""
    why = _FORBIDDEN.get()
    if why is not None and queries:
        raise GenerationNeeded(f"generation was asked for {len(queries)} queries (first {queries[0].id!r}) "
                               f"where it cannot run: {why}")
    batch_size = batch_size or _BATCH.get() or DEFAULT_GENERATION_BATCH
    cache = _PIXELS.get()
    tok = bundle.processor.tokenizer
    out: list[str] = []
    queries = list(queries)
    graphable = (torch.device(bundle.input_device).type == "cuda" and graph_obstacle(bundle.model) is None
                 and greedy_obstacle(bundle.model.generation_config) is None)
    for start in range(0, len(queries), batch_size):
        chunk = queries[start:start + batch_size]
        prompts = [render_prompt(bundle.processor, q, prompt) for q in chunk]
        # Images processed several at once (the device waits for them: 128 images at 1024 px are
        # ~2.4 s in one thread); the same pixel values as the processor's own call (tested).
        pixels = map_threads(lambda q: _pixels(bundle, q, cache), chunk, pixel_threads(), "mechprobe-generation-pixels")
        inputs = encode_pixels(bundle, prompts, pixels)
        if graphable:
            new = greedy_decode(bundle.model, inputs, max_new_tokens, tok.pad_token_id, graphs=True).tokens
        else:
            inputs.pop("position_ids")  # generate derives them from the mask
            ids = bundle.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=tok.pad_token_id)
            new = ids[:, inputs["input_ids"].shape[1]:]
        out += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
    return out
