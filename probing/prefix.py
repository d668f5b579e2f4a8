"""Prefix-shared forwards: rows that share a token prefix (system prompt, template, image) run
that prefix once and only their remaining tokens against its KV cache.

    prefix pass   [G, P]          -> KV cache, one copy per group of rows
    suffix pass   [rows, S]       attends to its group's cached prefix (expanded per layer, never
                                  stored per row) and to its own suffix; masks and position ids
                                  continue each row's prefix under left padding

`score_variant_groups` applies it to a defense's K variants of one image query (`run_plan` uses
it); `probing.sweep.score_conditions` to many prompt conditions over the same queries. Scores
equal independent passes to float rounding (tests/test_sweep.py: 1e-4 in float32).

Both score independent passes instead while the language model's layers carry hooks other than
the scorer's own (`prefix_obstacle`): a user's `hooks.edit` or `hooks.capture` block, or a raw
torch hook, would also run on the prefix pass, whose last tokens are not the rows' decision
positions (a positional edit would edit them, a capture would record the prefix rows too).

The scorer is used through its attributes only (this module sits below `probing.scorer` and
`probing.plan`, which import it).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicLayer

from hooks.points import language_model, layer_hooks

from .attention_mask import model_attention_mask
from .errors import InputError
from .pipeline import NOT_READY, HostResults, Prefetcher, device_inputs, encode_batch, pinned, to_device, vision_version
from .query import Query, QueryError, check_unique_ids, query_list, row_meta
from .render import PromptSpec, check_context, expanded_lengths, pad_rows, padded_position_ids, token_ids
from .score_table import ScoreTable

logger = logging.getLogger(__name__)


class SharedPrefixLayer(DynamicLayer):
    """A read-only KV cache layer: each query's prefix serves ``repeats`` consecutive rows (an int
    for every query, or a ``[queries]`` tensor of counts when groups differ in size).

    ``update`` returns prefix + new states for attention and stores nothing, so the expanded
    prefix exists for one layer at a time.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, repeats: "int | torch.Tensor",
                 rows: int | None = None):
        super().__init__()
        self.keys, self.values, self.repeats = keys, values, repeats
        # the rows the counts add up to, known on the host: with it, `repeat_interleave` by a
        # device tensor does not wait for the device to learn its output size (once per layer,
        # twice, in every suffix forward: on a GPU ~1 ms of idle device each)
        self.rows = int(repeats.sum()) if isinstance(repeats, torch.Tensor) and rows is None else rows
        self.device, self.dtype = keys.device, keys.dtype
        self.is_initialized = True

    def _join(self, prefix: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        if isinstance(self.repeats, torch.Tensor):
            return torch.cat([prefix.repeat_interleave(self.repeats, 0, output_size=self.rows), new], -2)
        b, h, p, d = prefix.shape
        out = new.new_empty(b * self.repeats, h, p + new.shape[-2], d)
        out.view(b, self.repeats, h, p + new.shape[-2], d)[..., :p, :] = prefix[:, None]
        out[..., p:, :] = new
        return out

    def update(self, key_states, value_states, *args, **kwargs):
        return self._join(self.keys, key_states), self._join(self.values, value_states)


def prefix_obstacle(scorer) -> str | None:
    """Why prefix-shared passes must not run now, or None: hooks on the language model's layers
    other than the scorer's own (see the module docstring). Read on the calling thread just
    before scoring, since hooks come and go with ``with`` blocks."""
    extra = layer_hooks(scorer.bundle, exclude=scorer.own_hook_ids)
    if not extra:
        return None
    return (f"{len(extra)} hook(s) not the scorer's are active on the language model's layers "
            f"({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}: an edit or capture block, or a raw "
            f"torch hook), and they would also run on the shared prefix's pass")


def common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def _image_identity(image):
    """One image: a path by its string, an in-memory image by its object."""
    return str(image) if isinstance(image, (str, os.PathLike)) else id(image)


def _same_image(queries: Sequence[Query]) -> bool:
    """Whether every query carries the same image (one object, or one path)."""
    if any(q.image is None for q in queries):
        return False
    return len({_image_identity(q.image) for q in queries}) == 1


def split_by_image_prefix(queries: Sequence[Query], ids: Sequence[list[int]], groups: Sequence[Sequence[int]],
                          image_id: int) -> list[list[int]]:
    """Each group's rows split by their image and their tokens up to and including it (the system
    prompt and template before the image), so rows of different conditions that agree there can
    share a prefix pass; rows without an image stand alone."""
    out = []
    for rows in groups:
        buckets: dict = {}
        for r in rows:
            seq = ids[r]
            if queries[r].image is None or image_id not in seq:
                out.append([r])
                continue
            key = (_image_identity(queries[r].image), tuple(seq[: seq.index(image_id) + 1]))
            buckets.setdefault(key, []).append(r)
        out += buckets.values()
    return out


def _tokens(scorer, queries: Sequence[Query], specs: Sequence[PromptSpec]) -> tuple[list[str], list[list[int]]]:
    """Every row's prompt and its (unexpanded) token ids."""
    prompts = scorer.render(queries, list(specs))
    return prompts, token_ids(scorer.bundle, prompts)


def _shared_lengths(queries: Sequence[Query], ids: Sequence[list[int]], groups: Sequence[Sequence[int]],
                    image_id: int) -> list[int | None]:
    """Each group's shared prefix length in unexpanded tokens, or None when it cannot share."""
    shared = []
    for rows in groups:
        if len(rows) < 2 or not _same_image([queries[i] for i in rows]):
            shared.append(None)
            continue
        seqs = [ids[i] for i in rows]
        n = min(common_prefix(seqs), min(len(x) for x in seqs) - 1)  # every suffix non-empty
        shared.append(n if image_id in seqs[0][:n] else None)
    return shared


def variant_prefixes(scorer, queries: Sequence[Query], specs: Sequence[PromptSpec],
                     groups: Sequence[Sequence[int]]):
    """For each group of rows (variants of one query, ``queries[i]`` under ``specs[i]``): its shared
    prefix length in unexpanded tokens when its rows can share a prefix pass, else None; and
    every row's prompt and token ids.

    A group shares when it has several rows, they carry the same image, and their common token
    prefix covers it (a system prompt, the template, the image): text variants of one image query
    (`ni_text_smooth`, text around the request). Rows with different images or no image gain
    little or nothing from a shared prefix and are scored as usual."""
    prompts, ids = _tokens(scorer, queries, specs)
    return prompts, ids, _shared_lengths(queries, ids, groups, scorer.bundle.image_token_id)


@dataclass
class VariantGroups:
    """A `score_variant_groups` call worked out before any forward (`plan_variant_groups`): the
    rows, their prompts and unexpanded token ids, the groups (split by image prefix if asked),
    each group's shared prefix length (None: it does not share), the groups that share cut into
    ``batches``, the rows that do not share (``rest``) as a planned `RefusalScorer.score` call
    (``rest_plan``, None when every row shares), and ``first``: ``batches[0]`` prepared ahead
    (`prepare_first`), or `NOT_READY`."""

    queries: list[Query]
    specs: list[PromptSpec]
    prompts: list[str]
    ids: list[list[int]]
    groups: list[list[int]]
    shared: list[int | None]
    sharing: list[int]
    batches: list[list[int]]
    rest: list[int]
    rest_plan: object | None
    first: object = field(default=NOT_READY, repr=False)


def plan_variant_groups(scorer, queries: Sequence[Query], specs: Sequence[PromptSpec],
                        groups: Sequence[Sequence[int]], *, split: bool = False) -> VariantGroups:
    """The host work of `score_variant_groups` before any forward: the rows checked (every
    failure named before any compute), tokenized, grouped and batched. Touches no model, so it
    may run in another thread (the study's plan-ahead worker, which then calls `prepare_first`)."""
    queries, specs = query_list(queries, "score_variant_groups"), list(specs)
    if not queries:
        raise InputError("score_variant_groups: no queries given")
    if len(specs) != len(queries):
        raise InputError(f"score_variant_groups: {len(specs)} prompt specs for {len(queries)} queries")
    check_unique_ids(queries)
    if sorted(i for g in groups for i in g) != list(range(len(queries))):
        raise InputError(f"score_variant_groups: the groups must hold each of the {len(queries)} rows exactly once")
    prompts, ids = _tokens(scorer, queries, specs)
    image_id = scorer.bundle.image_token_id
    groups = split_by_image_prefix(queries, ids, groups, image_id) if split else [list(g) for g in groups]
    shared = _shared_lengths(queries, ids, groups, image_id)
    sharing = [g for g, n in enumerate(shared) if n is not None]
    for g in sharing:  # fail before any compute: a missing image, an input beyond the context
        head = queries[groups[g][0]]
        if not hasattr(head.image, "convert") and not Path(head.image).is_file():
            raise QueryError(f"query {head.id!r}: image file not found: {head.image}")
    shared_rows = [i for g in sharing for i in groups[g]]
    if shared_rows:
        check_context(scorer.bundle, [queries[i] for i in shared_rows],
                      expanded_lengths(scorer.bundle, [ids[i] for i in shared_rows], [1] * len(shared_rows)))
    rest = sorted(set(range(len(queries))) - set(shared_rows))
    order = sorted(sharing, key=lambda g: (-shared[g], g))
    batches = group_batches(order, [len(groups[g]) for g in order], scorer.batch_size)
    rest_plan = scorer.plan_score([queries[i] for i in rest], [specs[i] for i in rest]) if rest else None
    return VariantGroups(queries, specs, prompts, ids, groups, shared, sharing, batches, rest, rest_plan)


def _prepare_groups(scorer, plan: VariantGroups, batch: list[int]) -> dict:
    """One batch of sharing groups, prepared on the host (`prepare_prefixed`)."""
    groups, shared, ids = plan.groups, plan.shared, plan.ids
    heads = [groups[g][0] for g in batch]
    return prepare_prefixed(scorer, [plan.queries[i] for i in heads], [plan.prompts[i] for i in heads],
                            [ids[i] for i in heads], [shared[g] for g in batch],
                            [[ids[i][shared[g]:] for i in groups[g]] for g in batch])


def prepare_first(scorer, plan: VariantGroups) -> VariantGroups:
    """``plan`` with the first batch of each of its parts prepared now (the first prefix-shared
    batch, the first batch of the other rows): where the planning runs ahead, the call's first
    forwards then wait for no encoding."""
    if plan.batches:
        plan.first = _prepare_groups(scorer, plan, plan.batches[0])
    if plan.rest_plan is not None:
        scorer.prepare_first(plan.rest_plan)
    return plan


def score_variant_groups(scorer, queries: Sequence[Query], specs: Sequence[PromptSpec],
                         groups: Sequence[Sequence[int]], *, split: bool = False, meta: dict | None = None,
                         desc: str = "variants") -> ScoreTable:
    """``scorer.score(queries, prompt=specs)``, with each group of variant rows that share an image
    and the tokens up to it (see `variant_prefixes`) run as one prefix pass plus a short suffix
    pass per row: K text variants of an image query cost about one image forward, not K.

    ``groups`` partitions the row indices (one group per original query). Rows come back in input
    order; scores equal independent passes to float rounding (tests/test_sweep.py: 1e-4 in
    float32), groups that do not share are scored by `RefusalScorer.score` itself. ``split``:
    split each group by image and the tokens up to it first (`split_by_image_prefix`), so a group
    may hold rows of many conditions of one query (`experiments.study` passes them so).
    `plan_variant_groups` + `score_planned_groups`, for a caller that plans ahead.
    """
    return score_planned_groups(scorer, plan_variant_groups(scorer, queries, specs, groups, split=split),
                                meta=meta, desc=desc)


def score_planned_groups(scorer, plan: VariantGroups, *, meta: dict | None = None,
                         desc: str = "variants") -> ScoreTable:
    """`score_variant_groups` for a call planned by `plan_variant_groups` (possibly in another
    thread, its first batches possibly prepared there by `prepare_first`)."""
    if not plan.sharing:
        return scorer.score_planned(plan.rest_plan, meta=meta, desc=desc)
    blocked = prefix_obstacle(scorer)
    if blocked:
        logger.info("%s: scoring all %d rows in full passes, not prefix-shared: %s", desc, len(plan.queries), blocked)
        return scorer.score_planned(scorer.plan_score(plan.queries, plan.specs), meta=meta, desc=desc)
    queries, groups, rest, batches = plan.queries, plan.groups, plan.rest, plan.batches
    bundle = scorer.bundle
    n, n_layers = len(queries), len(scorer.layers)
    margin = torch.empty(n)
    lens = torch.empty(n, n_layers)
    hidden = torch.empty(n, n_layers, bundle.d_model) if scorer.keep_hidden and n_layers else None
    disable = (not scorer.progress) if scorer.progress is not None else (None if len(batches) > 1 else True)
    first, plan.first = plan.first, NOT_READY  # a planned call's prepared batch is used once

    # The prefix batches are prepared from the start (eager), while the other rows are scored.
    with Prefetcher(functools.partial(_prepare_groups, scorer, plan), batches, depth=scorer.prefetch,
                    name=f"mechprobe-prefetch[{desc}]", eager=bool(rest), first=first) as feed, \
            scorer.holding_hooks():
        if rest:  # rows of groups that do not share: the scorer's own path
            table = scorer.score_planned(plan.rest_plan, desc=desc)
            idx = torch.tensor(rest)
            margin[idx], lens[idx] = table.margin, table.lens_margin
            if hidden is not None:
                hidden[idx] = table.hidden
        results = HostResults(margin, lens, hidden)
        for batch, prepared in tqdm(zip(batches, feed), total=len(batches), desc=f"{desc} (shared prefix)",
                                    unit="batch", disable=disable):
            results.add(torch.tensor([i for g in batch for i in groups[g]]), *score_prefixed(scorer, prepared))
        results.flush()
    scorer.waited_s += feed.wait_s
    logger.info("scored %d rows: %d groups of variants shared their image prefix (%d rows), %d rows alone",
                n, len(plan.sharing), n - len(rest), len(rest))
    out_meta = {**scorer.table_meta(PromptSpec()), **(meta or {}), "prefix_shared_groups": len(plan.sharing)}
    table = ScoreTable([q.id for q in queries], [q.label for q in queries], margin, lens, list(scorer.layers),
                       hidden, out_meta, [row_meta(q) for q in queries])
    table.check_finite(desc)  # as `RefusalScorer.score_planned`
    return table


#: suffix rows of one prefix-shared batch, in multiples of the scorer's batch size: each row holds
#: its group's prefix keys and values expanded for one layer at a time
ROWS_PER_BATCH = 8


def group_batches(order: list[int], sizes: list[int], batch_size: int) -> list[list[int]]:
    """Groups (in ``order``, ``sizes[k]`` rows for ``order[k]``) cut into batches of at most
    ``batch_size`` groups and ``ROWS_PER_BATCH * batch_size`` rows (a larger group goes alone)."""
    batches, current, rows = [], [], 0
    for g, n in zip(order, sizes):
        if current and (len(current) == batch_size or rows + n > ROWS_PER_BATCH * batch_size):
            batches.append(current)
            current, rows = [], 0
        current.append(g)
        rows += n
    if current:
        batches.append(current)
    return batches


def bundle_extra(scorer) -> int:
    """Positions one image adds beyond its single placeholder token."""
    return scorer.bundle.image_seq_length - 1


def prepare_prefixed(scorer, heads, head_prompts, head_ids, shared, suffixes) -> dict:
    """The CPU side of one prefix-shared batch (run ahead by the prefetch worker).

    Groups of prompts share a token prefix: ``head_prompts[g]`` is one full prompt of group g (its
    query ``heads[g]`` gives the image), whose first ``shared[g]`` (unexpanded) tokens
    ``head_ids[g][:shared[g]]`` every row of the group shares; ``suffixes[g]`` holds each row's
    remaining token ids. Images loaded and processed (pixel cache), prefix and suffix batches
    padded left."""
    bundle = scorer.bundle
    image_id, extra = bundle.image_token_id, bundle_extra(scorer)
    keys = [] if scorer.feature_cache.enabled else None
    full = encode_batch(bundle, head_prompts, heads, scorer.pixel_cache, device="cpu", keys=keys)
    pad = bundle.tokenizer.pad_token_id
    prefix_rows = []
    for r in range(len(heads)):
        real = full["input_ids"][r][full["attention_mask"][r].bool()]
        n_exp = shared[r] + extra * head_ids[r][: shared[r]].count(image_id)
        prefix_rows.append(real[:n_exp])
    prefix_ids, prefix_mask = pad_rows(prefix_rows, pad)
    suffix_ids, suffix_mask = pad_rows([x for group in suffixes for x in group], pad)
    counts = [len(x) for x in suffixes]
    prefix = {"input_ids": prefix_ids, "attention_mask": prefix_mask}
    if full.get("pixel_values") is not None:
        prefix["pixel_values"] = full["pixel_values"]
    suffix = {"suffix_ids": suffix_ids, "suffix_mask": suffix_mask, "counts": torch.tensor(counts)}
    # pinned for a CUDA device: `score_prefixed` copies them without waiting for the device; the
    # padding is read here, on the host (`probing.attention_mask`)
    device = bundle.input_device
    return {"prefix": pinned(prefix, device), "suffix": pinned(suffix, device), "keys": keys, "counts": counts,
            "padded": not bool(prefix_mask.all())}


@torch.inference_mode()
def score_prefixed(scorer, batch: dict):
    """The device side of one prefix-shared batch from `prepare_prefixed`: one prefix pass over
    the groups, one suffix pass over all rows (group-major), each row against its group's cached
    prefix. Returns ``margin [rows]``, ``lens [rows, L]``, ``hidden [rows, L, d]`` or None."""
    bundle = scorer.bundle
    device = bundle.input_device
    # copies queued without waiting (a blocking one would first drain the device)
    kwargs = device_inputs(bundle.model, batch["prefix"], device, batch["keys"], scorer.feature_cache,
                           vision_version(bundle.model) if batch["keys"] else None)
    suffix = to_device(batch["suffix"], device)
    prefix_mask = kwargs["attention_mask"]
    kwargs["position_ids"] = padded_position_ids(prefix_mask)
    kwargs["attention_mask"] = model_attention_mask(language_model(bundle.model), prefix_mask, batch["padded"])
    cache = bundle.model.model(**kwargs, use_cache=True).cache
    counts = batch["counts"]
    repeats = counts[0] if len(set(counts)) == 1 else suffix["counts"]
    rows = sum(counts)
    cache.layers = [SharedPrefixLayer(layer.keys, layer.values, repeats, rows) for layer in cache.layers]

    suffix_mask = suffix["suffix_mask"]
    prefix_rep = prefix_mask.repeat_interleave(repeats, 0, output_size=rows)
    mask = torch.cat([prefix_rep, suffix_mask], 1)
    position_ids = prefix_rep.sum(-1, keepdim=True) + padded_position_ids(suffix_mask)
    return scorer.forward({"input_ids": suffix["suffix_ids"], "attention_mask": mask, "position_ids": position_ids},
                          cache=cache, left_padded=True)  # suffixes padded left
