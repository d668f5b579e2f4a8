"""The hot path: batched refusal scoring with fused logit extraction.

One no-grad forward of the LLaVA trunk per batch (vision tower, projector, language model; no
``lm_head`` over the vocabulary, no KV cache). Hooks keep only the decision-position residual of
each requested layer; the readout gathers only the unembedding rows of its refusal and comply
tokens, and all layers' logit-lens margins come from one einsum:

    lens_logits[b, l, t] = final_norm(h[b, l]) . W_U[t]        t in refusal + comply tokens

so nothing of size ``[batch, seq, vocab]`` or ``[layers, batch, seq, d_model]`` is ever built.
"""

from __future__ import annotations

import functools
import logging
import operator
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from hooks.capture import DecisionCapture

from .attention_mask import model_attention_mask
from .model import ModelBundle
from .pipeline import (DEFAULT_FEATURE_CACHE_MB, DEFAULT_PIXEL_CACHE_MB, NOT_READY, HostResults, PixelCache,
                       Prefetcher, device_inputs, encode_batch, pinned, vision_version)
from .plan import as_plan, run_plan
from .query import Query, QueryError, check_unique_ids, query_list, row_meta  # noqa: F401 (row_meta: re-exported)
from .readout import Readout, ResolvedReadout, get_readout, resolve_readout
from .render import PromptSpec, check_context, plan_batches, prompt_lengths, render_prompt
from .errors import InputError, MechprobeError, ScoringError
from .score_table import ScoreTable

logger = logging.getLogger(__name__)


@dataclass
class PlannedScore:
    """One `RefusalScorer.score` call worked out before any forward (`RefusalScorer.plan_score`).

    ``prompt`` as given (one spec or one per query); ``prompts``, ``lengths``: each query's
    rendered prompt and its length in tokens (images expanded); ``batches``: row indices per
    batch, in scoring order; ``use_features``: whether the feature cache serves its images;
    ``first``: ``batches[0]`` prepared ahead (`RefusalScorer.prepare_first`), or `NOT_READY`."""

    queries: list[Query]
    prompt: "PromptSpec | Sequence[PromptSpec]"
    prompts: list[str]
    lengths: list[int]
    batches: list[list[int]]
    use_features: bool
    first: object = field(default=NOT_READY, repr=False)

    @property
    def order(self) -> list[int]:
        """Row indices (into ``queries``) in the order `RefusalScorer.score_planned` runs them: its
        batches in turn. A `hooks.capture` around the call records its forwards in this order."""
        return [i for rows in self.batches for i in rows]

    def in_table_order(self, captured: torch.Tensor) -> torch.Tensor:
        """``captured [N, ...]`` recorded in `order` (``cache[name]`` of a `hooks.capture` around a
        ``score`` call of these queries and prompt, no defense) with its rows put in table order.

            planned = scorer.plan_score(queries)
            with capture(bundle, [name]) as cache:
                table = scorer.score_planned(planned)      # or scorer.score(queries): same batches
            per_query = planned.in_table_order(cache[name])   # row i is table.ids[i]
        """
        n = len(self.queries)
        if not isinstance(captured, torch.Tensor) or captured.shape[0] != n:
            got = tuple(captured.shape) if isinstance(captured, torch.Tensor) else type(captured).__name__
            raise InputError(f"in_table_order: expected one captured row per query ({n}), got {got}: capture "
                             f"around exactly one score call of these queries, without a defense")
        index = torch.empty(n, dtype=torch.long)
        index[torch.tensor(self.order)] = torch.arange(n)  # table row i <- the forward row that held it
        return captured[index.to(captured.device)]


def _index(value, what: str) -> int:
    """An integer argument (Python, numpy or 0-d tensor integers; not bool, float or str)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise InputError(f"{what} must be an integer, got {value!r} ({type(value).__name__})") from None


def resolve_layers(layers, n_layers: int) -> list[int]:
    """"all" -> every layer, None -> none, an int -> that one layer, or a list of (possibly
    negative) indices; anything else is an `InputError` naming ``layers``."""
    if layers is None:
        return []
    if isinstance(layers, str):
        if layers == "all":
            return list(range(n_layers))
        raise InputError(f"layers must be 'all', None, a layer index or a list of them, got {layers!r}")
    if not hasattr(layers, "__iter__"):
        layers = [_index(layers, "layers")]
    out = []
    for layer in layers:
        i = _index(layer, "each of layers")
        if not -n_layers <= i < n_layers:
            raise InputError(f"layers: {layer} out of range for a model with {n_layers} layers")
        out.append(i % n_layers)
    return out


def lens_logits_of(normed: torch.Tensor, w: torch.Tensor, w_bmm: torch.Tensor | None = None) -> torch.Tensor:
    """``einsum("bld,td->blt", normed, w)`` as the one ``bmm`` einsum runs for it (same operands,
    same strides, so the same bits; tests/test_scorer.py checks it), without einsum's per-call
    planning: ``[batch, L, d] x [n_tokens, d] -> [batch, L, n_tokens]``. ``w_bmm``: the view
    ``w.t().unsqueeze(0)`` made once by the caller (the same operand)."""
    b, n_layers, d = normed.shape
    if w_bmm is None:
        w_bmm = w.t().unsqueeze(0)
    return torch.bmm(normed.reshape(1, b * n_layers, d), w_bmm).view(b, n_layers, w.shape[0])


# Arguments only LLaVA's wrapper (`LlavaModel`) understands: with none of them, its forward is
# its language model's on embedded ids.
_IMAGE_ARGS = frozenset({"pixel_values", "image_sizes", "vision_feature_layer", "vision_feature_select_strategy",
                         "mm_encoder_outputs"})


def _as_float32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


class RefusalScorer:
    """Scores queries in batches: refusal margin, p_refuse, per-layer lens margins, hidden states.

    Args:
        bundle: from `load_model`.
        readout: a `Readout`, or "first_token" / "yes_no".
        layers: "all", a list of layer indices (negative ones count from the end), one index, or
            None (no lens margins / hidden states).
        keep_hidden: also return decision-position residuals ``[N, L, d_model]`` (float32, CPU).
        batch_size: queries per forward.
        prompt: system prompt / surrounding text applied to every query.
        progress: show a tqdm bar (None: only on a terminal and when there is more than one batch).
        prefetch: batches prepared ahead of the forward by a background thread (images loaded and
            processed, text tokenized); 0 prepares each batch inline. Scores are the same bits.
        pixel_cache: MiB of processed pixel values kept across `score` calls (0: none), or a
            `probing.pipeline.PixelCache` to share; the same image under several conditions is
            decoded and processed once. Scores are the same bits.
        feature_cache: MiB of image features (vision tower + projector output, on the model's
            device) kept across `score` calls (0: none), or a `PixelCache` to share; the same
            image under several prompt conditions, text variants or defenses that keep the
            model's vision weights runs through the vision tower once. Keyed by the image and
            `probing.pipeline.vision_version`, so changed vision weights never reuse features.
            The first pass over an image gives the same bits as without the cache; a later batch
            that reuses features computed in another batch composition agrees to float rounding
            (tests/test_pipeline.py: 1e-5 in float32).
        share_prefix: a defense's variants of one image query that differ only after the image
            (`ni_text_smooth`'s K noisy texts, text around the request) run the shared prefix
            (system prompt, template, image) once and each variant's remaining tokens against its
            KV cache (`probing.prefix.score_variant_groups`): scores agree with independent passes
            to float rounding (1e-4 in float32, tested). False scores every variant in full, and
            so does a call made while a user's `hooks.edit` / `hooks.capture` block (or a raw torch
            hook) is active on the layers (`probing.prefix.prefix_obstacle`).

    After `score`, ``last_timing`` holds the run's ``total_s``, ``forward_s`` and ``wait_s`` (the
    time the loop waited for prepared batches); ``waited_s`` sums that wait over every scoring
    loop of the scorer's lifetime (`score`, the prefix-shared and sweep paths).
    """

    def __init__(
        self,
        bundle: ModelBundle,
        readout: Readout | str = "first_token",
        *,
        layers="all",
        keep_hidden: bool = False,
        batch_size: int = 8,
        prompt: PromptSpec = PromptSpec(),
        progress: bool | None = None,
        prefetch: int = 2,
        pixel_cache: "PixelCache | float" = DEFAULT_PIXEL_CACHE_MB,
        feature_cache: "PixelCache | float" = DEFAULT_FEATURE_CACHE_MB,
        share_prefix: bool = True,
    ):
        batch_size = _index(batch_size, "batch_size")
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        self.bundle = bundle
        self.readout = get_readout(readout) if isinstance(readout, str) else readout
        self.resolved: ResolvedReadout = resolve_readout(self.readout, bundle.tokenizer)
        self.layers = resolve_layers(layers, bundle.n_layers)
        self.keep_hidden = keep_hidden
        self.batch_size = batch_size
        self.prompt = prompt
        self.progress = progress
        prefetch = _index(prefetch, "prefetch")
        if prefetch < 0:
            raise InputError(f"prefetch must be >= 0, got {prefetch}")
        self.prefetch = int(prefetch)
        self.pixel_cache = (pixel_cache if isinstance(pixel_cache, PixelCache)
                            else PixelCache(int(float(pixel_cache) * 2**20)))
        self.feature_cache = (feature_cache if isinstance(feature_cache, PixelCache)
                              else PixelCache(int(float(feature_cache) * 2**20)))
        self.share_prefix = bool(share_prefix)
        self.last_timing: dict = {}
        self.waited_s = 0.0
        # Only these rows of the unembedding are ever used: [n_tokens, d_model].
        self._w_readout = bundle.unembed[self.resolved.token_ids].detach().float()
        self._w_views: dict = {}  # device -> (w, w.T, w.t().unsqueeze(0)): views made once
        # The hot path's hooks, resolved once: decision-position residuals of self.layers.
        self._reader = DecisionCapture(bundle, self.layers)
        # Modules the hot path calls, looked up once (the bundle's properties walk the model).
        self._trunk = bundle.model.model
        self._final_norm = bundle.final_norm

    # -- preparation ---------------------------------------------------------------------------

    def prompt_spec(self, extra: PromptSpec = PromptSpec()) -> PromptSpec:
        spec = self.prompt.merged(extra)
        if self.readout.question:
            spec = spec.merged(PromptSpec(text_after=self.readout.question))
        return spec

    def render(self, queries: Sequence[Query], extra: PromptSpec | Sequence[PromptSpec] = PromptSpec()) -> list[str]:
        """Prompt strings; ``extra`` is one spec for all queries or one per query."""
        extras = [extra] * len(queries) if isinstance(extra, PromptSpec) else list(extra)
        if len(extras) != len(queries):
            raise InputError(f"render: {len(extras)} prompt specs for {len(queries)} queries")
        return [render_prompt(self.bundle.processor, q, self.prompt_spec(e)) for q, e in zip(queries, extras)]

    # -- the hot path --------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, inputs: dict[str, torch.Tensor], *, left_padded: bool = False, **model_kwargs):
        """Score one encoded batch.

        ``left_padded=True`` promises that every row's last position is a real token (the
        caller built the batch so: `score` checks each batch's mask on the CPU, the sweep pads
        left itself); the decision position is then read as the last one, without the mask
        arithmetic (the same values). Otherwise it is found from the attention mask, so any
        padding works. ``model_kwargs`` go to the trunk (e.g. a prefix ``cache``; the attention
        mask then covers prefix and input). Returns ``margin [batch]``, ``lens_margin [batch, L]``
        and ``hidden [batch, L, d_model]`` (hidden in the model's dtype, on its device).
        """
        model_kwargs.setdefault("use_cache", False)
        reader = self._reader
        # Layers may sit on several devices (device_map): gather captures where the norm is.
        reader.device = self._final_norm.weight.device
        reader.left_padded = left_padded
        trunk = self._trunk
        if _IMAGE_ARGS.isdisjoint(inputs) and _IMAGE_ARGS.isdisjoint(model_kwargs):
            # No image to encode (text only, or image features already in ``inputs_embeds``):
            # LLaVA's wrapper would only embed the ids and call its language model with the same
            # arguments, so call that directly (the same bits, tested; ~40-145 us less per forward,
            # which shows on short inputs). Looked up per call: a merged fine-tune replaces it.
            trunk = trunk.language_model
        try:
            if reader.active:  # `score` holds the hooks around all its batches: nothing to register
                out = trunk(**inputs, **model_kwargs)
            else:
                with reader:  # hooks on every requested layer, removed when the block ends
                    out = trunk(**inputs, **model_kwargs)
            # already through the final norm; contiguous as the gathered rows were (same matmul)
            final = reader.select(out.last_hidden_state).contiguous()
        finally:
            reader.left_padded = False
        # Conversions only where they change something: on short inputs each no-op `.to()` /
        # `.float()` is a dispatch as long as a small kernel.
        views = self._w_views.get(final.device)
        if views is None:
            w = self._w_readout.to(final.device)
            views = self._w_views[final.device] = (w, w.T, w.t().unsqueeze(0))
        w, w_t, w_bmm = views
        logits = _as_float32(final) @ w_t  # [batch, n_tokens]
        if not self.layers:
            empty = final.new_zeros(final.shape[0], 0)
            return self.resolved.margin(logits), empty.float(), None
        hidden = reader.hidden()  # [batch, L, d_model]
        normed = _as_float32(self._final_norm(hidden))
        if normed.device != w.device:
            normed = normed.to(w.device)
        lens_logits = lens_logits_of(normed, w, w_bmm)  # [batch, L, n_tokens]
        # One margin for the output and every layer (rows reduce independently: the same bits as
        # two calls, checked in tests/test_scorer.py).
        both = self.resolved.margin(torch.cat([lens_logits, logits[:, None]], 1))
        margin, lens = both[:, -1], both[:, :-1]
        return margin, lens, hidden

    def holding_hooks(self):
        """Keep the hot path's hooks registered across `forward` calls inside the block (`score`
        does this around its batches); they are removed when the block ends, also on an error."""
        return self._reader

    @property
    def own_hook_ids(self) -> set[int]:
        """The ids of the scorer's own hooks registered now (`probing.prefix.prefix_obstacle`
        tells them from a user's)."""
        return self._reader.hook_ids

    # -- public API ----------------------------------------------------------------------------

    def score(
        self,
        queries: Iterable[Query],
        *,
        prompt: PromptSpec | Sequence[PromptSpec] = PromptSpec(),
        meta: dict | None = None,
        desc: str = "scoring",
        defense=None,
    ) -> ScoreTable:
        """Score queries; the table's rows follow the input order. A forward that gives NaN or
        infinite scores raises `ScoringError` naming the defense (in ``desc``) and the queries.

        ``prompt`` is one spec for every query or one per query. ``defense`` (a
        `defenses.Defense`, a `ScoringPlan`, or a name such as "sr_self_reminder+mo_checkpoint"
        once `defenses` is imported) is applied through its plan: query variants, model and
        activation edits; its name and parameters are recorded.

        A `hooks.capture` around this call records the forwards in the order they run (batches
        sorted by prompt length), not in table order; `plan_score(queries, prompt).order` is that
        order and its `in_table_order` restores table order. ``table.hidden`` holds the
        decision-position residuals of ``layers`` in table order already.
        """
        if defense is not None:
            queries = query_list(queries, "score")
            return run_plan(self, queries, as_plan(defense, queries, self.bundle), prompt=prompt, meta=meta,
                            desc=desc)
        return self.score_planned(self.plan_score(queries, prompt), meta=meta, desc=desc)

    def plan_score(self, queries: Iterable[Query], prompt: PromptSpec | Sequence[PromptSpec] = PromptSpec()
                   ) -> PlannedScore:
        """The host work of `score` before any forward: queries checked (unique ids, image files,
        the context window), prompts rendered, lengths counted, batches planned. Touches no model,
        so it may run in another thread (the study's plan-ahead worker); `prepare_first` then
        encodes the first batch there too, and `score_planned` scores it."""
        queries = query_list(queries, "score")
        if not queries:
            raise InputError("score: no queries given")
        check_unique_ids(queries)
        for q in queries:  # fail before any compute on a missing file
            if q.has_image and not hasattr(q.image, "convert"):
                if not Path(q.image).is_file():
                    raise QueryError(f"query {q.id!r}: image file not found: {q.image}")
        prompts = self.render(queries, prompt)
        lengths = prompt_lengths(self.bundle, prompts, [int(q.has_image) for q in queries])
        check_context(self.bundle, queries, lengths)
        return PlannedScore(queries, prompt, prompts, lengths, plan_batches(lengths, self.batch_size),
                            self.feature_cache.enabled and any(q.has_image for q in queries))

    def prepare_batch(self, planned: PlannedScore, rows: list[int]) -> tuple:
        """Batch ``rows`` of a planned call as CPU tensors: images loaded, pixels processed (or
        cached), text tokenized; runs in the prefetch worker while the previous batch is in the
        model. Returns the inputs (pinned for a CUDA device), each image's feature-cache key (or
        None), whether every row ends on a real token, and whether any row is padded."""
        queries, lengths = planned.queries, planned.lengths
        ids = [queries[i].id for i in rows]
        keys = [] if planned.use_features else None
        try:
            inputs = encode_batch(self.bundle, [planned.prompts[i] for i in rows], [queries[i] for i in rows],
                                  self.pixel_cache, device="cpu", keys=keys)
        except MechprobeError:  # QueryError and friends already name the query
            raise
        except Exception as exc:
            raise ScoringError(f"preparing queries {ids}: {type(exc).__name__}: {exc}") from exc
        mask = inputs["attention_mask"]
        got = mask.sum(-1).tolist()  # CPU tensors: no device sync
        want = [lengths[i] for i in rows]
        if got != want:
            raise ScoringError(f"token count mismatch for queries {ids}: processor gave {got}, expected {want}")
        # pinned for a CUDA device, so the main thread's copy does not wait for the device;
        # left-padded: the forward's fast read; padded: the ready 4-D mask (`attention_mask`)
        return pinned(inputs, self.bundle.input_device), keys, bool(mask[:, -1].all()), not bool(mask.all())

    def prepare_first(self, planned: PlannedScore) -> PlannedScore:
        """``planned`` with its first batch prepared now (`prepare_batch`): called where the
        planning runs ahead, so the call's first forward does not wait for its encoding."""
        planned.first = self.prepare_batch(planned, planned.batches[0])
        return planned

    def score_planned(self, planned: PlannedScore, *, meta: dict | None = None, desc: str = "scoring") -> ScoreTable:
        """`score` for a call planned by `plan_score` (possibly in another thread, its first
        batch possibly prepared there)."""
        queries, batches = planned.queries, planned.batches
        n, n_layers = len(queries), len(self.layers)
        margin = torch.empty(n)
        lens = torch.empty(n, n_layers)
        hidden = torch.empty(n, n_layers, self.bundle.d_model) if self.keep_hidden and n_layers else None
        # tqdm's disable=None hides the bar when stderr is not a terminal.
        disable = (not self.progress) if self.progress is not None else (None if len(batches) > 1 else True)
        device = self.bundle.input_device
        # read here, in the main thread: the vision weights may have changed since the planning
        version = vision_version(self.bundle.model) if planned.use_features else None
        first, planned.first = planned.first, NOT_READY  # a planned call's prepared batch is used once

        start = time.perf_counter()
        forward_s = 0.0
        results = HostResults(margin, lens, hidden)
        with Prefetcher(functools.partial(self.prepare_batch, planned), batches, depth=self.prefetch,
                        name=f"mechprobe-prefetch[{desc}]", first=first) as feed, self.holding_hooks():
            for rows, (cpu_inputs, keys, left_padded, padded) in tqdm(zip(batches, feed), total=len(batches),
                                                                       desc=desc, unit="batch", disable=disable):
                t0 = time.perf_counter()
                inputs = device_inputs(self.bundle.model, cpu_inputs, device, keys, self.feature_cache, version)
                inputs["attention_mask"] = model_attention_mask(self._trunk.language_model, inputs["attention_mask"],
                                                                padded)
                results.add(torch.tensor(rows), *self.forward(inputs, left_padded=left_padded))
                forward_s += time.perf_counter() - t0
            results.flush()
        elapsed = time.perf_counter() - start
        self.last_timing = {"batches": len(batches), "total_s": elapsed, "wait_s": feed.wait_s,
                            "forward_s": forward_s}
        self.waited_s += feed.wait_s
        logger.info("scored %d queries in %d batches, %.2fs (%.1f queries/s; %.0f%% of it waiting for data; "
                    "pixel cache %d hits, %d misses; feature cache %d hits, %d misses)", n, len(batches), elapsed,
                    n / max(elapsed, 1e-9), 100 * feed.wait_s / max(elapsed, 1e-9), self.pixel_cache.hits,
                    self.pixel_cache.misses, self.feature_cache.hits, self.feature_cache.misses)
        shown = planned.prompt if isinstance(planned.prompt, PromptSpec) else PromptSpec()
        table = ScoreTable([q.id for q in queries], [q.label for q in queries], margin, lens,
                           list(self.layers), hidden, {**self.table_meta(shown), **(meta or {})},
                           [row_meta(q) for q in queries])
        table.check_finite(desc)  # NaN / inf scores: a ScoringError naming the call (its defense) and queries
        return table

    def with_bundle(self, bundle: ModelBundle) -> "RefusalScorer":
        """The same scorer settings over another model (e.g. a fine-tuned defense model)."""
        # The pixel cache is shared when the images are processed the same way for the same dtype;
        # the feature cache always (its keys carry the vision weights' identity and version).
        same = bundle.processor is self.bundle.processor and bundle.dtype == self.bundle.dtype
        return RefusalScorer(bundle, self.readout, layers=self.layers or None, keep_hidden=self.keep_hidden,
                             batch_size=self.batch_size, prompt=self.prompt, progress=self.progress,
                             prefetch=self.prefetch,
                             pixel_cache=self.pixel_cache if same else self.pixel_cache.max_bytes / 2**20,
                             feature_cache=self.feature_cache, share_prefix=self.share_prefix)

    def table_meta(self, prompt: PromptSpec = PromptSpec()) -> dict:
        """What a ScoreTable records about how it was scored."""
        return {
            "model": self.bundle.name,
            "readout": self.readout.name,
            "question": self.readout.question,
            "refusal_words": list(self.readout.refusal_words),
            "comply_words": list(self.readout.comply_words),
            "refusal_ids": list(self.resolved.refusal_ids),
            "comply_ids": list(self.resolved.comply_ids),
            "prompt": vars(self.prompt_spec(prompt)),
        }
