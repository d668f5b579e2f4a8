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
back to independent passes automatically, and so does a sweep run while hooks other than the
scorer's are active on the layers (a `hooks.edit` or `hooks.capture` block around it:
`probing.prefix.prefix_obstacle`). The prefix and suffix passes are `probing.prefix`'s,
which also lets a defense's text variants of one query share its image prefix.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from einops import rearrange
from tqdm.auto import tqdm

from .errors import InputError
from .pipeline import Prefetcher
from .prefix import common_prefix, prefix_obstacle, prepare_prefixed, score_prefixed
from .query import Query, check_unique_ids, query_list, row_meta
from .render import PromptSpec, check_context, prompt_lengths
from .score_table import ScoreTable
from .scorer import RefusalScorer

logger = logging.getLogger(__name__)


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
        n = min(common_prefix(seqs), min(len(s) for s in seqs) - 1)  # every suffix non-empty
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
    queries = query_list(queries, "score_conditions")
    if not queries or not conditions:
        raise InputError("score_conditions needs queries and at least one condition")
    check_unique_ids(queries)
    names, specs = list(conditions), list(conditions.values())
    blocked = prefix_obstacle(scorer) if len(specs) > 1 else None
    plan = plan_prefixes(scorer, queries, specs) if len(specs) > 1 and not blocked else None
    if plan is None:
        logger.info("prefix sharing does not apply: scoring %d conditions independently%s", len(specs),
                    f" ({blocked})" if blocked else "")
        return {n: scorer.score(queries, prompt=conditions[n], meta={"condition": n}, desc=n) for n in names}
    prompts, ids, shared = plan
    bundle, n_cond = scorer.bundle, len(specs)
    for c in range(n_cond):
        check_context(bundle, queries, prompt_lengths(bundle, prompts[c], [int(q.has_image) for q in queries]))

    n, n_layers = len(queries), len(scorer.layers)
    margin = torch.empty(n_cond, n)
    lens = torch.empty(n_cond, n, n_layers)
    hidden = torch.empty(n_cond, n, n_layers, bundle.d_model) if scorer.keep_hidden and n_layers else None
    order = sorted(range(n), key=lambda i: (-shared[i], i))
    batches = [order[i: i + scorer.batch_size] for i in range(0, n, scorer.batch_size)]
    disable = (not scorer.progress) if scorer.progress is not None else (None if len(batches) > 1 else True)

    def prepare(rows):
        return prepare_prefixed(scorer, *_condition_batch(queries, rows, prompts, ids, shared))

    with Prefetcher(prepare, batches, depth=scorer.prefetch, name=f"mechprobe-prefetch[{desc}]") as feed:
        for rows, batch in tqdm(zip(batches, feed), total=len(batches), desc=desc, unit="batch", disable=disable):
            m, lm, h = (_split_conditions(t, n_cond) for t in score_prefixed(scorer, batch))
            idx = torch.tensor(rows)
            for c in range(n_cond):
                margin[c, idx] = m[c].cpu()
                lens[c, idx] = lm[c].cpu()
                if hidden is not None:
                    hidden[c, idx] = h[c].float().cpu()
    scorer.waited_s += feed.wait_s
    tables = {}
    for c, name in enumerate(names):
        meta = scorer.table_meta(conditions[name])
        meta.update({"condition": name, "prefix_shared": True})
        tables[name] = ScoreTable([q.id for q in queries], [q.label for q in queries], margin[c].clone(),
                                  lens[c].clone(), list(scorer.layers),
                                  None if hidden is None else hidden[c].clone(), meta,
                                  [row_meta(q) for q in queries])
        tables[name].check_finite(f"condition {name!r}")
    return tables


def _condition_batch(queries, rows, prompts, ids, shared):
    """`prepare_prefixed`'s arguments for the conditions of ``rows``' queries (query-major rows)."""
    n_cond = len(prompts)
    return ([queries[i] for i in rows], [prompts[0][i] for i in rows], [ids[0][i] for i in rows],
            [shared[i] for i in rows], [[ids[c][i][shared[i]:] for c in range(n_cond)] for i in rows])


def _split_conditions(t, n_cond):
    """Suffix rows are query-major (row = query * C + condition): regroup them condition-first."""
    return None if t is None else rearrange(t, "(query cond) ... -> cond query ...", cond=n_cond)
