"""Prefix-shared scoring of many prompt conditions over the same queries.

In LLaVA-1.5's template every request starts with ``USER: <image>\\n``: 576 image tokens that
are most of the sequence and identical across prompt-level conditions that only change text
after the image. `score_conditions` runs each query's shared token prefix once (vision tower
included), keeps its KV cache, and runs only each condition's suffix against it:

    prefix pass   [B, P]        -> KV cache, one copy per query
    suffix pass   [B * C, S]    attends to the query's cached prefix (broadcast per layer, never
                                stored C times) and to its own suffix; masks and position ids
                                continue each row's prefix under left padding

Scores equal independent passes (tested to 1e-4 in float32). Conditions that change the system
prompt (text before the image) or that give a query no common prefix covering its image fall
back to independent passes automatically.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from einops import rearrange
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicLayer

from .pipeline import cached_image_inputs, encode_batch, vision_version
from .query import Query, check_unique_ids
from .render import PromptSpec, check_context, padded_position_ids, prompt_lengths
from .score_table import ScoreTable
from .scorer import RefusalScorer, row_meta
from .errors import InputError

logger = logging.getLogger(__name__)


class SharedPrefixLayer(DynamicLayer):
    """A read-only KV cache layer: each query's prefix serves ``repeats`` consecutive rows.

    ``update`` returns prefix + new states for attention and stores nothing, so the expanded
    prefix exists for one layer at a time.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, repeats: int):
        super().__init__()
        self.keys, self.values, self.repeats = keys, values, repeats
        self.device, self.dtype = keys.device, keys.dtype
        self.is_initialized = True

    def _join(self, prefix: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        b, h, p, d = prefix.shape
        out = new.new_empty(b * self.repeats, h, p + new.shape[-2], d)
        out.view(b, self.repeats, h, p + new.shape[-2], d)[..., :p, :] = prefix[:, None]
        out[..., p:, :] = new
        return out

    def update(self, key_states, value_states, *args, **kwargs):
        return self._join(self.keys, key_states), self._join(self.values, value_states)


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def plan_prefixes(scorer: RefusalScorer, queries: Sequence[Query], specs: list[PromptSpec]):
    """Token ids of every (condition, query) prompt and each query's shared prefix length
    (unexpanded tokens), or None when prefix sharing does not apply."""
    if len({scorer.prompt_spec(s).system_prompt for s in specs}) > 1:
        return None
    tok = scorer.bundle.tokenizer
    image_id = scorer.bundle.image_token_id
    prompts = [scorer.render(queries, s) for s in specs]  # [C][N]
    ids = [tok(p, add_special_tokens=True)["input_ids"] for p in prompts]
    shared = []
    for i, q in enumerate(queries):
        seqs = [ids[c][i] for c in range(len(specs))]
        n = min(_common_prefix(seqs), min(len(s) for s in seqs) - 1)  # every suffix non-empty
        if q.has_image and image_id not in seqs[0][:n]:
            return None
        shared.append(n)
    return prompts, ids, shared


def score_conditions(
    scorer: RefusalScorer,
    queries: Sequence[Query],
    conditions: dict[str, PromptSpec],
    *,
    desc: str = "sweep",
) -> dict[str, ScoreTable]:
    """Score every query under every prompt condition; one ScoreTable per condition."""
    queries = list(queries)
    if not queries or not conditions:
        raise InputError("score_conditions needs queries and at least one condition")
    check_unique_ids(queries)
    names, specs = list(conditions), list(conditions.values())
    plan = plan_prefixes(scorer, queries, specs) if len(specs) > 1 else None
    if plan is None:
        logger.info("prefix sharing does not apply: scoring %d conditions independently", len(specs))
        return {n: scorer.score(queries, prompt=conditions[n], meta={"condition": n}, desc=n) for n in names}
    prompts, ids, shared = plan
    bundle, n_cond, extra = scorer.bundle, len(specs), bundle_extra(scorer)
    for c in range(n_cond):
        check_context(bundle, queries, prompt_lengths(bundle, prompts[c], [int(q.has_image) for q in queries]))

    n, n_layers = len(queries), len(scorer.layers)
    margin = torch.empty(n_cond, n)
    lens = torch.empty(n_cond, n, n_layers)
    hidden = torch.empty(n_cond, n, n_layers, bundle.d_model) if scorer.keep_hidden and n_layers else None
    order = sorted(range(n), key=lambda i: (-shared[i], i))
    batches = [order[i: i + scorer.batch_size] for i in range(0, n, scorer.batch_size)]
    disable = (not scorer.progress) if scorer.progress is not None else (None if len(batches) > 1 else True)
    for rows in tqdm(batches, desc=desc, unit="batch", disable=disable):
        m, lm, h = _score_batch(scorer, queries, rows, prompts, ids, shared, extra)
        idx = torch.tensor(rows)
        for c in range(n_cond):
            margin[c, idx] = m[c].cpu()
            lens[c, idx] = lm[c].cpu()
            if hidden is not None:
                hidden[c, idx] = h[c].float().cpu()
    tables = {}
    for c, name in enumerate(names):
        meta = scorer.table_meta(conditions[name])
        meta.update({"condition": name, "prefix_shared": True})
        tables[name] = ScoreTable([q.id for q in queries], [q.label for q in queries], margin[c].clone(),
                                  lens[c].clone(), list(scorer.layers),
                                  None if hidden is None else hidden[c].clone(), meta,
                                  [row_meta(q) for q in queries])
    return tables


def bundle_extra(scorer: RefusalScorer) -> int:
    """Positions one image adds beyond its single placeholder token."""
    return scorer.bundle.image_seq_length - 1


@torch.inference_mode()
def _score_batch(scorer, queries, rows, prompts, ids, shared, extra):
    bundle, n_cond = scorer.bundle, len(prompts)
    image_id = bundle.image_token_id
    # Prefix pass: the first condition's prompt, cut after the shared tokens (images expanded).
    # Pixels from the scorer's cache; each image's key comes from the same load (feature cache).
    keys = [] if scorer.feature_cache.enabled else None
    full = encode_batch(bundle, [prompts[0][i] for i in rows], [queries[i] for i in rows], scorer.pixel_cache,
                        keys=keys)
    pad = bundle.tokenizer.pad_token_id
    prefix_rows = []
    for r, i in enumerate(rows):
        real = full["input_ids"][r][full["attention_mask"][r].bool()]
        n_exp = shared[i] + extra * ids[0][i][: shared[i]].count(image_id)
        prefix_rows.append(real[:n_exp])
    p_len = max(len(x) for x in prefix_rows)
    device = bundle.input_device
    prefix_ids = torch.full((len(rows), p_len), pad, dtype=torch.long, device=device)
    prefix_mask = torch.zeros((len(rows), p_len), dtype=torch.long, device=device)
    for r, x in enumerate(prefix_rows):
        prefix_ids[r, p_len - len(x):] = x
        prefix_mask[r, p_len - len(x):] = 1
    kwargs = {"input_ids": prefix_ids, "attention_mask": prefix_mask,
              "position_ids": padded_position_ids(prefix_mask)}
    if "pixel_values" in full:
        kwargs["pixel_values"] = full["pixel_values"]
        if keys is not None:  # each image through the vision tower once per run
            kwargs = cached_image_inputs(bundle.model, kwargs, keys, scorer.feature_cache,
                                         vision_version(bundle.model))
    cache = bundle.model.model(**kwargs, use_cache=True).cache
    cache.layers = [SharedPrefixLayer(layer.keys, layer.values, n_cond) for layer in cache.layers]

    # Suffix pass: rows ordered query-major (query r, condition c) -> r * n_cond + c.
    suffixes = [torch.tensor(ids[c][i][shared[i]:]) for i in rows for c in range(n_cond)]
    s_len = max(len(s) for s in suffixes)
    suffix_ids = torch.full((len(suffixes), s_len), pad, dtype=torch.long, device=device)
    suffix_mask = torch.zeros((len(suffixes), s_len), dtype=torch.long, device=device)
    for r, s in enumerate(suffixes):
        suffix_ids[r, s_len - len(s):] = s
        suffix_mask[r, s_len - len(s):] = 1
    prefix_rep = prefix_mask.repeat_interleave(n_cond, 0)
    mask = torch.cat([prefix_rep, suffix_mask], 1)
    position_ids = prefix_rep.sum(-1, keepdim=True) + padded_position_ids(suffix_mask)
    m, lm, h = scorer.forward({"input_ids": suffix_ids, "attention_mask": mask, "position_ids": position_ids},
                              cache=cache, left_padded=True)  # suffixes padded left above
    # suffix rows are query-major (row = query * C + condition): regroup them condition-first
    def split(t):
        return None if t is None else rearrange(t, "(query cond) ... -> cond query ...", cond=n_cond)

    return split(m), split(lm), split(h)
