"""study: the paper's whole analysis over a combined benchmark, in one command.

    mechprobe study --config examples/study.toml
    mechprobe study --model tiny-random --dataset mossbench:../shared/data/mossbench --limit 20 \\
        --defenses sr_self_reminder,qr_caption_no_image --ensembles "sr_self_reminder+qr_caption_no_image"

Every distinct forward happens once per run directory (``<out>/``):

- the baseline and each single defense are scored once, shard by shard (`experiments.runs.RunDir`,
  so an interrupted study resumes);
- ``a+b`` ensembles are scored as composites (`defenses.Compose`, the members' own instances);
- score-level ensembles (``a|b``, ``a&b``, ``a~b``) are combined from their members' finished
  tables (`probing.plan.combine_tables`), never scored again;
- a fine-tuned model (``mo_finetune``) is trained once and saved in ``<out>/models/<name>/``; every
  condition of the run (and a resumed run) uses that copy;
- query-rewriting generations (captions, intentions) are cached per defense and model in
  ``<out>/generations/``, and so is the generation cross-check; they are generated for the whole
  run before the first chunk, in batches fitted to the device's free memory.

Conditions that only change the inputs are scored query-major, chunk by chunk; while one chunk is
scored, a worker thread prepares the next (`experiments.plan_ahead`: its noise draws, prompts and
images), so the device does not wait for the host.

Outputs: ``summary.csv|json`` (one row per condition), ``scores/<condition>/`` (ScoreTables, no
hidden states), ``tables/`` (conditions: every figure with intervals; per_dataset; tradeoff;
layers; generation_check; datasets; per_query.csv), the figures and ``report.md`` /
``report.html`` (self-contained, figures inline).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from defenses import Compose, register
from defenses.base import Defense
from defenses.noise import shared_perturbations
from defenses.prompts import sr_custom
from defenses import registry
from defenses.registry import REGISTRY, check_names
from defenses.rewriting import Caption, Intention
from probing import RefusalScorer, load_model
from probing.aggregate import OPERATORS
from probing.analysis import auroc, compare, layer_profile, rank_ensembles, refusal_rate
from probing.errors import InputError
from probing.generation import fit_generation_batch, generation_batch
from probing.model import model_fingerprint
from probing.pipeline import PixelCache, pixel_threads
from probing.plan import ScoringPlan, as_plan, combine_tables, expand_variants, fold_table
from probing.prefix import VariantGroups, plan_variant_groups, prepare_first, score_planned_groups
from probing.query import Query, check_images
from probing.readout import get_readout
from probing.render import LLAVA_V1_SYSTEM, PromptSpec, format_spec, tokenizer_lock
from probing.score_table import ScoreTable

from . import options, study_config
from .common import (NO_HIDDEN_SCORE_LEVEL, check_device, check_labels, check_layer_folds, split_top,
                     stratified_head, warn_out_of_vocabulary)
from .kept import CachedRewrite, kept, query_key
from .plan_ahead import PlanAhead
from .report import write_table
from .runs import RunDir, read_cache, write_atomic
from .shard_writer import ShardWriter
from .study_config import ANALYSIS_KEYS, StudyConfig

logger = logging.getLogger(__name__)

add_arguments = options.study  # the options live in experiments/options.py

SCORE_OPS = tuple(OPERATORS)  # "|", "&", "~": combined from finished tables
INPUT_CATEGORIES = ("SR", "QR", "NI")  # defenses that only change the model's inputs
#: Loaders whose ids already say where a query came from.
OWN_PREFIX = {"mossbench": "moss-", "mmsafetybench": "mmsb-"}


# --- datasets ----------------------------------------------------------------------------------

def spread_sample(queries: list[Query], n: int) -> list[Query]:
    """``n`` queries spread evenly over the list within each label (half harmful, half benign
    where both exist), so every dataset of a concatenation is represented."""
    if n >= len(queries):
        return list(queries)
    by: dict = {}
    for q in queries:
        by.setdefault(q.label, []).append(q)
    labels = list(by)
    share = {lab: n // len(labels) + (1 if i < n % len(labels) else 0) for i, lab in enumerate(labels)}
    out = []
    for lab in labels:
        items, k = by[lab], min(share[lab], len(by[lab]))
        out += [items[int(j * len(items) / k)] for j in range(k)] if k else []
    order = {q.id: i for i, q in enumerate(queries)}
    return sorted(out, key=lambda q: order[q.id])


def load_dataset(entry: dict) -> tuple[list[Query], dict]:
    """One ``[[datasets]]`` entry -> its queries (limit applied) and a row for tables/datasets."""
    from probing.datasets import LoadReport, load_jsonl, load_mmsafetybench, load_mossbench, toy

    name, report = entry["name"], LoadReport()
    opt = {k: entry[k] for k in study_config.DATASET_KEYS[name] if k in entry}
    if name == "toy":
        queries = toy.requests(opt.get("split", "test"))
    elif name == "mossbench":
        queries = load_mossbench(opt.pop("root"), **opt, report=report)
    elif name == "mmsafetybench":
        queries = load_mmsafetybench(opt.pop("root"), **opt, report=report)
    else:
        queries = load_jsonl(opt.pop("path"), **opt, report=report)
    loaded = len(queries)
    queries = stratified_head(queries, entry.get("limit"))
    row = {"dataset": entry["tag"], "name": name, "loaded": loaded, "skipped": len(report.skipped),
           "used": len(queries), "harmful": sum(q.label == "harmful" for q in queries),
           "benign": sum(q.label == "benign" for q in queries), "limit": entry.get("limit"),
           "source": entry.get("root") or entry.get("path") or "probing.datasets.toy (test split)"}
    return queries, row


def load_datasets(entries: list[dict]) -> tuple[list[Query], list[dict]]:
    """The concatenation of every dataset; ids unique and saying where each query came from
    (prefixed ``<tag>/`` unless the loader's own ids already do), ``meta["dataset"]`` = the tag."""
    queries, rows = [], []
    for entry in entries:
        qs, row = load_dataset(entry)
        own = OWN_PREFIX.get(entry["name"])
        prefix = len(entries) > 1 and not (own and entry["tag"] == entry["name"]
                                           and all(q.id.startswith(own) for q in qs))
        queries += [dataclasses.replace(q, id=f"{entry['tag']}/{q.id}" if prefix else q.id,
                                        meta={**q.meta, "dataset": entry["tag"]}) for q in qs]
        rows.append(row)
    seen, dup = set(), []
    for q in queries:
        (dup.append(q.id) if q.id in seen else seen.add(q.id))
    if dup:
        raise InputError(f"query ids repeat across the study's datasets: {dup[:5]}; give the datasets distinct 'tag's")
    unlabelled = [q.id for q in queries if q.label not in ("harmful", "benign")]
    if unlabelled:
        raise InputError(f"the study needs harmful/benign labels; {len(unlabelled)} queries have none: {unlabelled[:5]}")
    n_h = sum(q.label == "harmful" for q in queries)
    if n_h < 2 or len(queries) - n_h < 2:
        raise InputError(f"the study needs at least 2 harmful and 2 benign queries over its datasets, got {n_h} "
                         f"harmful and {len(queries) - n_h} benign (add a dataset with the missing label, e.g. "
                         "MOSSBench for benign queries)")
    return queries, rows


# --- published wordings ------------------------------------------------------------------------

def prompt_factory(name: str, entry: dict):
    """A registry factory for one prompt-file entry (SR: system prompt / text around the request;
    QR: a caption or intention question)."""
    if entry["kind"] == "sr":
        return functools.partial(sr_custom, entry.get("system_prompt"), entry.get("text_before", ""),
                                 entry.get("text_after", ""), name=name)
    return functools.partial(_qr_custom, name, entry["question"], entry.get("style", "caption"),
                             entry.get("keep_image", False), entry.get("max_new_tokens", 24))


def _qr_custom(name: str, question: str, style: str, keep_image: bool, max_new_tokens: int) -> Defense:
    params = {"question": question, "style": style, "keep_image": keep_image, "max_new_tokens": max_new_tokens}
    if style == "intention":
        return Intention(name=name, question=question, max_new_tokens=max_new_tokens, params=params)
    return Caption(name=name, keep_image=keep_image, max_new_tokens=max_new_tokens, question=question, params=params)


def register_prompts(path: str) -> dict[str, dict]:
    """Register every wording of a prompt file under its name (`defenses.register`); returns them."""
    entries = study_config.read_prompts(path)
    for name, entry in entries.items():
        factory = prompt_factory(name, entry)
        old = REGISTRY.get(name)
        if isinstance(old, functools.partial) and (old.func, old.args, old.keywords) == \
                (factory.func, factory.args, factory.keywords):
            continue  # the same wording registered again (a second study in one process)
        if old is not None:
            raise InputError(f"{path}: [{name}] is already a defense name; give the wording another name "
                             f"(e.g. {name}_paper)")
        register(name, factory)
    return entries


def check_defense_params(cfg: StudyConfig, names: list[str]) -> None:
    """Every ``[defense_params.<name>]`` names a single defense of the study's conditions
    (``names``), and every single defense builds with its parameters (the defense's own checks),
    before any dataset or model is loaded: a misspelt name or a bad value is one error naming the
    table and the file, not parameters silently unused or a failure after the baseline is scored.
    Of defenses built from the baseline's scores (``act_*``) the parameter names are checked."""
    import inspect
    import re

    from defenses import get_defense

    def where(name: str) -> str:
        return f"{cfg.source}: [defense_params.{name if re.fullmatch(r'[A-Za-z0-9_-]+', name) else json.dumps(name)}]"

    for name in cfg.defense_params:
        if name not in names:
            what = ("an ensemble expression: parameters go to single defenses" if split_top(name)[0] else
                    "not a single defense of the study's defenses and ensembles")
            raise InputError(f"{where(name)}: {what}{study_config.did_you_mean(name, names)} "
                             f"(they use: {', '.join(names) or 'none'})")
    for name in names:
        params, factory = cfg.defense_params.get(name, {}), REGISTRY[name]
        try:
            if registry.needs_baseline(factory):  # built once the baseline is scored
                try:
                    inspect.signature(factory).bind(None, **params)
                except TypeError as exc:
                    raise InputError(f"defense {name!r}: {exc}") from None
            else:
                get_defense(name, **params)  # built again, for its model, once the model is loaded
        except InputError as exc:
            raise InputError(f"{where(name)}: {exc}") from None


# --- run-directory names ----------------------------------------------------------------------

def condition_dir(name: str) -> str:
    """A folder name for a condition: '|' -> '_or_', '&' -> '_and_', '~' -> '_mean_'."""
    return name.replace("|", "_or_").replace("&", "_and_").replace("~", "_mean_")


# --- the study ---------------------------------------------------------------------------------

class FoldedTables(Mapping):
    """A chunk's tables by condition, each folded from the chunk's scored rows when first asked
    for: the study folds the scored condition's at once and the others' in its shard writer.
    Each table is folded once (a condition is asked for by one thread)."""

    def __init__(self, fold: Callable[[str], ScoreTable], names: list[str]):
        self._fold, self._names, self._done = fold, list(names), {}

    def __getitem__(self, name: str) -> ScoreTable:
        if name not in self._names:
            raise KeyError(name)
        if name not in self._done:
            self._done[name] = self._fold(name)
        return self._done[name]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


@dataclasses.dataclass
class QueryMajorRows:
    """Every row of one chunk's conditions in one list (`query_major_rows`): ``queries[i]`` under
    ``specs[i]``, its id prefixed by its condition's name; ``per_query[q]``: the rows of chunk
    query q (all conditions); ``where[name]``: the condition's first row and its rows per query,
    counted from there."""

    queries: list[Query]
    specs: list[PromptSpec]
    per_query: list[list[int]]
    where: dict[str, tuple[int, list[list[int]]]]


def query_major_rows(chunk: list[Query], plans: dict[str, ScoringPlan], bundle) -> QueryMajorRows:
    """The rows of every condition's plan for ``chunk``, condition after condition, grouped per
    query for `probing.prefix.plan_variant_groups`. Refuses a plan that changes more than the
    inputs of ``bundle`` (another model, or an activation edit, cannot share its forwards)."""
    flat, specs, where = [], [], {}
    per_query: list[list[int]] = [[] for _ in chunk]
    for n, plan in plans.items():
        if plan.edits or plan.members or plan.parts or (plan.bundle is not None and plan.bundle is not bundle):
            raise InputError(f"condition {n!r} does not only change the inputs; it cannot be scored query-major")
        rows, specs_n, local = expand_variants(chunk, plan)
        for i, group in enumerate(local):
            per_query[i] += [len(flat) + r for r in group]
        where[n] = (len(flat), local)
        flat += [dataclasses.replace(q, id=f"{n}\0{q.id}") for q in rows]
        specs += specs_n
    return QueryMajorRows(flat, specs, per_query, where)


@dataclasses.dataclass
class ChunkInputs:
    """One chunk's query-major work prepared ahead (`Study._chunk_inputs`): the conditions'
    plans, their rows, the rows planned for scoring (first batches encoded), and the images staged
    in the pixel cache for it (unstaged when the chunk is done)."""

    plans: dict[str, ScoringPlan]
    rows: QueryMajorRows
    grouped: VariantGroups
    staged: list


#: how the study keeps its own model while a tuned copy of it is saved (`Study._fingerprint`):
#: 2 = untouched (`defenses.finetune.merge_adapters`); runs made before tuned it in place. Every
#: condition scored on the study's own model (the baseline, scored first, aside) records it, tuned
#: copy or not, so adding or removing ``mo_finetune`` leaves the other conditions' shards alone
OWN_MODEL_REVISION = 2

#: most MiB each of the study's pixel and image-feature caches may hold (features live on the
#: model's device, where they also get at most a tenth of its memory: LLaVA-1.5-7B in bf16 needs
#: 4.7 MB an image, so 4096 MiB hold ~870 images)
IMAGE_CACHE_CAP_MB = 4096


def image_caches(bundle, n_images: int) -> tuple[PixelCache, PixelCache]:
    """The study's pixel and feature caches, sized to hold every image of the run once (up to
    `IMAGE_CACHE_CAP_MB` each).

    Pixels: the "keep" policy. Conditions scored one after another visit the same images in turn,
    a repeated scan, so whatever fits is served to every later condition; the query-major pass
    stores only the run's own images there (noise copies are staged beside it, for their chunk).

    Features (filled on the main thread, noise copies included): "lru" when every image of the
    run fits, so the query-major pass, which uses each chunk's images and copies together, keeps
    the recent ones, and a later scan of the run's images fits whole; "keep" when capped (LRU
    would serve a repeated scan nothing)."""
    item = torch.empty((), dtype=bundle.dtype).element_size()
    crop = getattr(bundle.processor.image_processor, "crop_size", None) or {}
    side = (crop.get("height", 336), crop.get("width", 336)) if isinstance(crop, dict) else (336, 336)
    need = {"pixel": n_images * 3 * side[0] * side[1] * item,
            "feature": n_images * bundle.image_seq_length * bundle.d_model * item}
    caps = {"pixel": IMAGE_CACHE_CAP_MB * 2**20,  # host memory
            # features live on the model's device: at most a tenth of an accelerator's memory
            "feature": min(IMAGE_CACHE_CAP_MB * 2**20, device_memory(bundle.input_device) // 10)}
    for what, size in need.items():
        if size > caps[what]:
            logger.info("%s cache: %d images need %.0f MiB, capped at %.0f MiB: the first %d images are cached",
                        what, n_images, size / 2**20, caps[what] / 2**20, int(n_images * caps[what] / size))
    # a little headroom: entries are stored at their exact size, so n_images fit exactly
    return (PixelCache(min(need["pixel"], caps["pixel"]) + 2**20, policy="keep"),
            PixelCache(min(need["feature"], caps["feature"]) + 2**20,
                       policy="lru" if need["feature"] <= caps["feature"] else "keep"))


def images_ahead(bundle) -> bool:
    """Whether up-front generation processes the next batch's images while a batch generates: on
    an accelerator, where the host only waits for the decode steps. On the CPU the worker would
    compete with the decode for the same cores (2 cores: the generation took ~20% longer,
    benchmarks/generation_ahead.py), so each batch's images are processed just before it."""
    return torch.device(bundle.input_device).type != "cpu"


def device_memory(device) -> int:
    """Total memory of a CUDA device in bytes; for the CPU (or anything else) a number large
    enough not to cap (host memory is bounded by `IMAGE_CACHE_CAP_MB` alone)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return 2**62


class Study:
    """One study: its config, queries, run directory, model, scorer and tables."""

    def __init__(self, cfg: StudyConfig):
        self.cfg = cfg
        self.wordings = register_prompts(cfg.prompts) if cfg.prompts else {}
        self.conditions = list(dict.fromkeys(["baseline", *cfg.defenses, *cfg.ensembles]))
        for key in ("defenses", "ensembles"):
            for name in getattr(cfg, key):
                try:
                    check_names(name)
                except InputError as exc:
                    raise InputError(f"{study_config.key_where(cfg.source, key)}: {exc}") from None
        names = list(dict.fromkeys(p for c in self.conditions[1:] for p in _members(c)))
        check_defense_params(cfg, names)
        self.queries, self.dataset_rows = load_datasets(cfg.datasets)
        check_labels(self.queries, "+".join(d.get("name", "?") for d in cfg.datasets))  # before any forward
        check_images(self.queries)  # every image file decodes: a corrupt one is named now, not mid-run
        check_layer_folds(self.queries, cfg.layer_scores, cfg.folds, f"{cfg.source}: 'folds'",
                          "lower 'folds' or raise the limits")
        warn_out_of_vocabulary(self.queries, cfg.model)
        check_device(cfg.device)
        self.needs_hidden = cfg.keep_hidden or any(n.startswith("act_") for n in names) or \
            any(s != "lens" for s in cfg.layer_scores)
        readout = get_readout(cfg.readout)
        # What identifies every condition's scores (see experiments/runs.py); checked without loading the model.
        # the model's part of it is also kept with a saved fine-tune and cached generations (experiments.kept)
        model_fp = model_fingerprint(cfg.model, dtype=cfg.dtype, device=cfg.device,
                                     image_aspect_ratio=cfg.image_aspect_ratio)
        self.model_identity = {**model_fp, "compile": True} if cfg.compile else model_fp
        fingerprint = {"experiment": "study", **model_fp,
                       "readout": {"name": readout.name, "question": readout.question,
                                   "refusal_words": list(readout.refusal_words),
                                   "comply_words": list(readout.comply_words)},
                       "prompt_format": cfg.prompt_format, "prompt_wordings": self.wordings}
        if cfg.compile:  # margins within ~1e-6 of the eager model's: compiled and eager shards are not mixed
            fingerprint["compile"] = True  # (absent when eager, so runs made before this resume)
        self.run = RunDir(cfg.out, {"experiment": "study", **cfg.as_dict(), "prompt_wordings": self.wordings},
                          overwrite=cfg.overwrite, ignore=(*ANALYSIS_KEYS, "prompts"), fingerprint=fingerprint)
        try:
            self.bundle = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, compile=cfg.compile,
                                     image_aspect_ratio=cfg.image_aspect_ratio)
        except BaseException:
            self.run.close()
            raise
        pixels, features = image_caches(self.bundle, sum(q.has_image for q in self.queries))
        self.scorer = RefusalScorer(self.bundle, cfg.readout, keep_hidden=self.needs_hidden,
                                    batch_size=cfg.batch_size, prompt=format_spec(cfg.prompt_format), progress=False,
                                    pixel_cache=pixels, feature_cache=features)
        self.tables: dict[str, ScoreTable] = {}
        self._defenses: dict[str, Defense] = {}
        #: host seconds of the query-major pass: up-front generation (and its wait for the next
        #: batch's images, processed ahead), waiting for plans built ahead, plans built in the main
        #: thread, the worker's fallbacks (`score_shared_prefixes`), the scoring loops' wait for
        #: prepared batches (images decoded and processed), and the wait for the shard writer
        #: (`experiments.shard_writer`) after each condition
        self.timings = {"generation_s": 0.0, "generation_image_wait_s": 0.0, "plan_wait_s": 0.0,
                        "plan_inline_s": 0.0, "plan_fallbacks": 0, "data_wait_s": 0.0, "store_wait_s": 0.0}

    # -- defenses and conditions -------------------------------------------------------------

    def defense(self, name: str) -> Defense:
        """One single defense, built once per study (so its trained model and captions are shared)."""
        from defenses import get_defense, registry

        if name not in self._defenses:
            baseline = None
            if registry.needs_baseline(REGISTRY[name]):
                baseline = self.table("baseline")
                if baseline.hidden is None:
                    raise InputError(f"{name!r} needs the baseline's hidden states, but this run directory's baseline "
                                     "was scored without them: set keep_hidden = true (or use --overwrite)")
            d = get_defense(name, baseline=baseline, **self.cfg.defense_params.get(name, {}))
            d = kept(d, self.run.path, name, self.bundle.name, device=self.cfg.device, dtype=self.cfg.dtype,
                     base=self.model_identity)
            self._defenses[name] = d
        return self._defenses[name]

    def _on_own_model(self, name: str) -> bool:
        """Whether a condition other than the baseline is scored on the study's own model: none of
        its members brings a model of its own (a tuned copy, `SavedModel`; a checkpoint)."""
        def own(part: str) -> bool:
            if part not in REGISTRY or registry.needs_baseline(REGISTRY[part]):
                return True  # activation edits apply to the study's model
            return type(self.defense(part)).model is Defense.model

        return name != "baseline" and all(own(p) for p in _members(name))

    def _fingerprint(self, name: str, defense) -> dict:
        fp = {"defense": defense.describe() if defense is not None else None}
        if self._on_own_model(name):
            # Before revision 2, saving the tuned copy merged its adapters into the weights it shares
            # with the study's model, so a condition scored after it ran on tuned weights: shards
            # and answers from then lack this key (or hold an older revision) and are recomputed
            # (`merge_adapters`). Recorded whether or not the study tunes a copy.
            fp["own_model"] = OWN_MODEL_REVISION
        if self.needs_hidden:  # activation defenses need the baseline's hidden states, diffmean / probe
            fp["hidden"] = True  # profiles every condition's: shards scored without them are recomputed
        if any(registry.needs_baseline(REGISTRY[p]) for p in _members(name) if p in REGISTRY):
            fp["baseline"] = self.run.condition_digest(condition_dir("baseline"))
        return fp

    def _score(self, name: str, defense) -> ScoreTable:
        return self.run.score(lambda qs: self.scorer.score(qs, defense=defense, meta={"condition": name}),
                              self.queries, condition_dir(name), self.cfg.batch_size,
                              fingerprint=self._fingerprint(name, defense))

    def table(self, name: str) -> ScoreTable:
        """The condition's table: scored once (shards), composed, or combined from its members."""
        if name in self.tables:
            return self.tables[name]
        op, parts = split_top(name)
        if op in SCORE_OPS:
            members = [self.table(p) for p in parts]
            table = combine_tables(members, OPERATORS[op], {"condition": name, "defense": name, "op": op,
                                                            "members": parts, "scored": False})
        else:
            table = self._score(name, self._scored_defense(name))
        self.tables[name] = table
        return table

    def kind(self, name: str) -> str:
        op, _ = split_top(name)
        return "baseline" if name == "baseline" else (op or "single")

    # -- the whole study -----------------------------------------------------------------------

    def _input_only(self, name: str) -> bool:
        """Whether the condition only changes the model's inputs: the baseline, SR / QR / NI
        defenses and "+" composites of them (the study's own model, no activation edits), whose
        rows can share each query's prefix with other conditions'."""
        if name == "baseline":
            return True
        op, parts = split_top(name)
        if op in SCORE_OPS:
            return False
        for part in (parts if op == "+" else [name]):
            if part not in REGISTRY or registry.needs_baseline(REGISTRY[part]):
                return False
            if self.defense(part).category not in INPUT_CATEGORIES:
                return False
        return True

    def _scored_defense(self, name: str) -> Defense | None:
        """What a scored condition applies: None for the baseline, the composite of a "+"
        ensemble's members (the study's own instances), or the single defense."""
        if name == "baseline":
            return None
        op, parts = split_top(name)
        return Compose(members=[self.defense(p) for p in parts]) if op == "+" else self.defense(name)

    def _condition_plan(self, name: str, chunk: list[Query]) -> ScoringPlan:
        if name == "baseline":
            return ScoringPlan("baseline", [[(q, PromptSpec())] for q in chunk])
        return as_plan(self._scored_defense(name), chunk, self.bundle)

    def _plans(self, names: list[str], chunk: list[Query]) -> dict[str, ScoringPlan]:
        """Every condition's plan for one chunk. Noise defenses shared by several conditions ("NI"
        and "SR+NI") perturb each query once."""
        with shared_perturbations():
            return {n: self._condition_plan(n, chunk) for n in names}

    def _chunk_inputs(self, names: list[str], chunk: list[Query]) -> ChunkInputs:
        """Everything of one chunk that `_score_query_major` needs before its first forward, built
        by `PlanAhead`'s worker while the previous chunk is scored: every condition's plan (noise
        draws, prompts), all their rows in one query-major list, every row's pixel values (the
        noise copies included) staged in the scorer's pixel cache (`PixelCache.stage_images`,
        several threads; only the chunk's own images are stored for later conditions), the rows
        checked, tokenized, grouped and batched (`probing.prefix.plan_variant_groups`), and the
        first batches encoded (`probing.prefix.prepare_first`): at the chunk boundary the main
        thread only launches the forwards. The staged images are unstaged once the chunk is
        scored (or its build discarded)."""
        plans = self._plans(names, chunk)
        rows = query_major_rows(chunk, plans, self.bundle)
        staged = self.scorer.pixel_cache.stage_images(self.bundle, rows.queries, threads=pixel_threads(), keep=chunk)
        try:
            grouped = plan_variant_groups(self.scorer, rows.queries, rows.specs, rows.per_query, split=True)
            return ChunkInputs(plans, rows, prepare_first(self.scorer, grouped), staged)
        except BaseException:
            self.scorer.pixel_cache.unstage(staged)
            raise

    def _score_query_major(self, chunk: list[Query], prepared: ChunkInputs) -> dict[str, ScoreTable]:
        """One chunk of every condition ``prepared`` holds (`_chunk_inputs`), query-major: all
        their rows (variants included) in one prefix-shared call
        (`probing.prefix.score_planned_groups`), one group per query split by image and the tokens
        up to it, so rows that agree there (same system prompt, same image) run that prefix once;
        then each condition's rows folded into its table. Each condition's table is folded when
        first asked for (`FoldedTables`)."""
        plans, flat, where = prepared.plans, prepared.rows.queries, prepared.rows.where
        table = score_planned_groups(self.scorer, prepared.grouped, desc="query-major")

        def fold(n: str) -> ScoreTable:
            offset, local = where[n]
            # this condition's rows, in its own order: `local` indexes them as they are
            mine = table.select([flat[offset + r].id for rows in local for r in rows])
            record = {"condition": n, **plans[n].record}
            t = fold_table(mine, chunk, local, plans[n].aggregate, record)
            if n == "baseline":  # as `scorer.score` records an undefended run
                t.row_meta = [{k: v for k, v in r.items() if k != "variants"} for r in t.row_meta]
            return t

        return FoldedTables(fold, list(where))

    def prepare_generations(self, names: list[str]) -> None:
        """Generate, up front, what the query-rewriting defenses among ``names`` (and their "+"
        members) need for every query of the run, into the run's generation cache. In batches fitted
        to the device (`probing.generation.fit_generation_batch`): on a GPU a decode step is
        bound by kernel launches, so 128 captions in one batch take one batch's decode steps, not
        eight. Done first so that building a chunk's plans never runs the model (`PlanAhead`'s
        worker cannot)."""
        parts = dict.fromkeys(p for n in names if n != "baseline" for p in _members(n))
        rewrites = [self.defense(p) for p in parts if isinstance(self.defense(p), CachedRewrite)]
        if not rewrites:
            return
        unique = list({query_key(q): q for q in self.queries}.values())
        unique.sort(key=lambda q: not q.has_image)  # captions are for image queries: full batches first
        tok = self.bundle.processor.tokenizer
        with tokenizer_lock(tok):
            longest = max(map(len, tok([q.text or "" for q in unique], add_special_tokens=False)["input_ids"]))
        prompt_tokens = longest + 64 + (self.bundle.image_seq_length if any(q.has_image for q in unique) else 0)
        t0 = time.perf_counter()
        jobs = []  # (defense, batch size, queries): one batch a call, each call stores its generations,
        for d in rewrites:  # so an interruption keeps them
            n = fit_generation_batch(self.bundle, prompt_tokens, d.inner.max_new_tokens, len(unique))
            logger.info("%s: generating for %d queries in batches of %d", d.name, len(unique), n)
            jobs += [(d, n, unique[start:start + n]) for start in range(0, len(unique), n)]
        cache = self.scorer.pixel_cache  # the scoring reuses these pixels

        def stage(_names, batch):  # the images a batch will generate for, processed (PixelCache.stage_images)
            return cache.stage_images(self.bundle, batch, threads=pixel_threads(), keep=batch)

        # The next batch's images are processed in a worker while this batch generates (on a GPU
        # the host only waits for the decode steps), so the device does not wait for them.
        # each batch's image queries without cached generations (the batches of a defense are disjoint)
        images = [[q for q in d.todo(batch, self.bundle) if q.has_image] for d, _, batch in jobs]
        with PlanAhead(stage, discard=cache.unstage, enabled=images_ahead(self.bundle)) as ahead:
            for i, (d, n, batch) in enumerate(tqdm(jobs, desc="generation", unit="batch")):
                staged = ahead.take(i, [d.name], images[i])
                if i + 1 < len(jobs):
                    ahead.submit(i + 1, [jobs[i + 1][0].name], images[i + 1])
                try:
                    with generation_batch(n, pixel_cache=cache):
                        d.transform(batch, self.bundle)
                finally:
                    cache.unstage(staged)
        self.timings["generation_s"] += time.perf_counter() - t0
        self.timings["generation_image_wait_s"] += ahead.wait_s

    def score_shared_prefixes(self) -> None:
        """Score every condition that only changes the inputs (`_input_only`) query-major, chunk by
        chunk, into the same resumable shards `table` would write: per query, the rows of all of
        them that share its image and the tokens up to it (the baseline, SR defenses with the same
        system prompt, QR defenses that keep the image, each text-noise variant) run that prefix
        once. The first missing condition of a chunk scores it for every condition whose shard is
        missing, and stores the others' shards at once (`RunDir.store_shard`): nothing waits in
        memory, and an interruption loses no chunk already scored.

        The device is kept busy: rewrites are generated for the whole run first
        (`prepare_generations`), and the next chunk is prepared in a worker thread while the
        current one is scored (`PlanAhead` with `_chunk_inputs`: plans with their noise draws,
        prompts, images, the rows grouped and batched, the first batches encoded)."""
        names = [n for n in self.conditions if n not in self.tables and self._input_only(n)]
        if len(names) < 2:
            return
        batch = self.cfg.batch_size
        chunks = self.run.shard_chunks(self.queries, batch)
        index = {tuple(q.id for q in c): k for k, c in enumerate(chunks)}
        fingerprints = {n: self._fingerprint(n, self._scored_defense(n)) for n in names}

        # which shards exist, read once (a shard record check hashes every query of its chunk,
        # in-memory images pixel by pixel), then kept up to date as shards are stored
        have = {(n, k) for n in names for k, c in enumerate(chunks)
                if self.run.has_shard(condition_dir(n), k, c, fingerprint=fingerprints[n])}

        def missing(name: str, k: int) -> list[str]:
            return [name] + [n for n in names if n != name and (n, k) not in have]

        def from_groups(name, planner, writer, bar):
            def score(chunk):
                k = index[tuple(q.id for q in chunk)]
                todo = missing(name, k)
                prepared = planner.take(k, todo, chunks[k])
                ahead = next((j for j in range(k + 1, len(chunks)) if (name, j) not in have), None)
                if ahead is not None:  # built while this chunk is scored
                    planner.submit(ahead, missing(name, ahead), chunks[ahead])
                try:
                    tables = self._score_query_major(list(chunk), prepared)
                finally:
                    self.scorer.pixel_cache.unstage(prepared.staged)

                def store(k=k, chunk=chunk, tables=tables, others=todo[1:]):
                    for n in others:
                        self.run.store_shard(condition_dir(n), k, chunk, tables[n], fingerprint=fingerprints[n])

                writer.submit(store)  # folded and stored while the next chunk is scored
                have.update((n, k) for n in todo)  # `name`'s own: stored by `RunDir.score` on return
                bar.update(len(chunk))
                return tables[name]
            return score

        if len(have) < len(names) * len(chunks):
            self.prepare_generations(names)
        waited = self.scorer.waited_s
        unstage = self.scorer.pixel_cache.unstage
        # most of a study's forwards: the bar counts the queries of the chunks still to score (each
        # chunk once, for every condition it lacks)
        left = sum(len(c) for k, c in enumerate(chunks) if any((n, k) not in have for n in names))
        with PlanAhead(self._chunk_inputs, discard=lambda built: unstage(built.staged)) as planner, \
                ShardWriter() as writer, \
                tqdm(total=left, desc=f"query-major ({len(names)} conditions)", unit="query",
                     disable=not left) as bar:
            for name in names:
                self.tables[name] = self.run.score(from_groups(name, planner, writer, bar), self.queries,
                                                   condition_dir(name), batch, fingerprint=fingerprints[name])
                writer.flush()  # the next condition's `RunDir.score` reads the shards stored for it
        self.timings["store_wait_s"] += writer.wait_s
        self.timings["plan_wait_s"] += planner.wait_s
        self.timings["plan_inline_s"] += planner.inline_s
        self.timings["plan_fallbacks"] += planner.fallbacks
        self.timings["data_wait_s"] += self.scorer.waited_s - waited
        logger.info("query-major scoring: waited %.1f s for plans built ahead, built %.1f s of plans inline "
                    "(%d fallbacks), waited %.1f s for prepared batches", planner.wait_s, planner.inline_s,
                    planner.fallbacks, self.timings["data_wait_s"])

    def close(self) -> None:
        """Release the run directory's lock (idempotent; `run_config` does it in ``finally``)."""
        self.run.close()

    def __enter__(self) -> "Study":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run_all(self) -> dict:
        cfg = self.cfg
        self.score_shared_prefixes()
        # the conditions scored query-major count as done: the bar moves with the ones left
        rest = [n for n in self.conditions if n not in self.tables]
        for name in tqdm(rest, desc="conditions", unit="condition", initial=len(self.conditions) - len(rest),
                         total=len(self.conditions), disable=not rest):
            self.table(name)
        base = self.tables["baseline"]
        effects = {n: compare(base, self.tables[n], name=n, n_boot=cfg.n_boot, seed=cfg.seed) for n in self.conditions}
        out = self.run.path
        shutil.rmtree(out / "scores", ignore_errors=True)
        for path in derived_outputs(out):  # an earlier run's (other options) would outlive this report
            path.unlink(missing_ok=True)
        for name in self.conditions:
            kept = self.tables[name].select(self.tables[name].ids)
            kept.hidden = None  # the shards keep hidden states; scores/ holds the scores only
            kept.save(out / "scores" / condition_dir(name))
        summary = [summary_row(n, self.kind(n), effects[n], self.tables[n]) for n in self.conditions]
        write_table(out / "summary", summary)
        self.run.write_table("conditions", [{"condition": n, "kind": self.kind(n), **effects[n].row()}
                                            for n in self.conditions])
        self.per_dataset = per_dataset_rows({n: self.tables[n] for n in self.conditions})
        self.run.write_table("per_dataset", self.per_dataset)
        self.run.write_table("datasets", self.dataset_rows)
        self.write_per_query()
        trade = self.tradeoff()
        layers, profiles = self.layers()
        generation = self.generation_check()
        from .report import write_study_report

        write_study_report(self, summary, effects, trade, profiles, generation)
        return {"summary": summary, "effects": effects, "tables": self.tables, "tradeoff": trade,
                "layers": layers, "generation": generation}

    def write_per_query(self) -> Path:
        import pandas as pd

        columns = ["id", "dataset", "kind", "scenario", "label", "text", "condition", "margin", "p_refuse"]
        frame = pd.concat([self.tables[n].to_pandas(condition=n)[columns] for n in self.conditions], ignore_index=True)
        path = self.run.path / "tables" / "per_query.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        frame.to_csv(tmp, index=False)
        os.replace(tmp, path)
        return path

    def tradeoff(self) -> dict:
        """Measured points (baseline, singles, run ensembles) and predicted pairs (rank_ensembles)."""
        cfg, base = self.cfg, self.tables["baseline"]
        singles = {n: self.tables[n] for n in cfg.defenses}
        ops = tuple(op for op in ("+", *SCORE_OPS) if any(split_top(e)[0] == op for e in cfg.ensembles)) or ("+", "|")
        order = list(singles)
        measured = {}
        for e in cfg.ensembles:
            op, parts = split_top(e)
            if len(parts) == 2 and all(p in singles for p in parts) and op in ops:
                # "+" applies its members in order: keyed as run. The others hold in either order.
                a, b = parts if op == "+" else sorted(parts, key=order.index)
                measured[f"{a}{op}{b}"] = (e, self.tables[e])
        cands = rank_ensembles(base, singles, ops=ops, weight=cfg.weight,
                               measured={k: t for k, (_, t) in measured.items()})
        rows = tradeoff_rows(cands, {k: e for k, (e, _) in measured.items()})
        covered = {r["measured_run"] for r in rows}
        from probing.analysis import safety_helpfulness

        for e in cfg.ensembles:  # ensembles the pair predictions do not cover: measured points only
            if e not in covered:
                s, h = safety_helpfulness(self.tables[e])
                rows.append({"name": e, "kind": split_top(e)[0], "measured_run": e, "predicted": False,
                             "safety": None, "helpfulness": None, "utility": None, "pareto": None,
                             "measured_safety": s, "measured_helpfulness": h})
        points = tradeoff_points(rows, cfg.weight)
        self.run.write_table("tradeoff", rows)
        return {"rows": rows, "points": points}

    def layers(self):
        cfg, base = self.cfg, self.tables["baseline"]
        rows, profiles = [], {s: [] for s in cfg.layer_scores}
        for score in cfg.layer_scores:
            for name in self.conditions[1:]:
                table = self.tables[name]
                if score != "lens" and (table.hidden is None or base.hidden is None):
                    why = NO_HIDDEN_SCORE_LEVEL if self.kind(name) in SCORE_OPS else "scored without hidden states"
                    logger.info("layers: no %s profile of %s: %s", score, name, why)
                    continue
                prof = layer_profile(base, table, score, name=name, n_folds=cfg.folds,
                                     n_boot=max(50, cfg.n_boot // 5), seed=cfg.seed)
                profiles[score].append(prof)
                rows += prof.rows()
        self.run.write_table("layers", rows)
        return rows, profiles

    def generation_check(self) -> dict | None:
        """Greedy answers for a small stratified sample under the baseline, judged by phrase match,
        against the readout's margin (cached in generations/baseline_check.json)."""
        from probing.generation import generate

        from .generation_check import REFUSAL_PHRASES, judge

        cfg = self.cfg
        if not cfg.generation_check:
            return None
        sample = spread_sample(self.queries, cfg.generation_check)
        file = self.run.path / "generations" / "baseline_check.json"
        key = {"max_new_tokens": cfg.max_new_tokens, "prompt_format": cfg.prompt_format, "texts_by": "query_key",
               "model": self.model_identity,
               "own_model": OWN_MODEL_REVISION}  # answered after any tuning: see `_fingerprint`
        key = json.loads(json.dumps(key, default=str))  # as read back from the file
        cache = read_cache(file, "the generation check's queries are answered again")
        texts = cache.get("texts", {}) if cache.get("key") == key and isinstance(cache.get("texts"), dict) else {}
        keys = {q.id: query_key(q) for q in sample}  # id, text and image: an edited query is answered again
        todo = [q for q in sample if keys[q.id] not in texts]
        if todo:
            answers = generate(self.bundle, todo, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                               prompt=format_spec(cfg.prompt_format))
            texts.update({keys[q.id]: a for q, a in zip(todo, answers)})
            file.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(file, json.dumps({"key": key, "texts": texts}, indent=1))
        texts = {q.id: texts[keys[q.id]] for q in sample}
        table = self.tables["baseline"].select([q.id for q in sample])
        margin = table.margin.numpy().astype(float)
        refused = np.array([judge(texts[q.id]) for q in sample])
        predicted = margin > 0
        rows = [{"id": q.id, "dataset": q.meta.get("dataset"), "label": q.label, "margin": float(m),
                 "p_refuse": float(1 / (1 + np.exp(-m))), "readout_refusal": bool(p), "generated_refusal": bool(r),
                 "generation": texts[q.id]} for q, m, p, r in zip(sample, margin, predicted, refused)]
        both = bool(refused.any() and (~refused).any())
        summary = {"n": len(rows), "max_new_tokens": cfg.max_new_tokens,
                   "generated_refusal_rate": float(refused.mean()), "readout_refusal_rate": float(predicted.mean()),
                   "agreement": float((predicted == refused).mean()),
                   "auroc": float(auroc(margin[refused], margin[~refused])) if both else None}
        self.run.write_table("generation_check", rows)
        self.run.write_table("generation_check_summary", [summary])
        return {"rows": rows, "summary": summary, "phrases": REFUSAL_PHRASES}


#: The tables (``tables/<name>.csv|json``) a study derives from its scores (`derived_outputs`).
STUDY_TABLES = ("conditions", "per_dataset", "datasets", "tradeoff", "layers", "generation_check",
                "generation_check_summary")


def derived_outputs(out: Path) -> list[Path]:
    """Everything `Study.run_all` derives from the scores in the run directory ``out`` (whatever
    its options): the summary, tables, figures and report. Removed before they are written again,
    so none an earlier run wrote under other options (its generation check, a layer score it
    dropped) stays beside the new report; nothing else in ``out`` is touched."""
    from .report import STUDY_FIGURES, layers_figure

    names = ["summary.csv", "summary.json", "report.md", "report.html", *STUDY_FIGURES,
             *(layers_figure(s) for s in study_config.LAYER_SCORES)]
    tables = [f"{t}.{ext}" for t in STUDY_TABLES for ext in ("csv", "json")] + ["per_query.csv"]
    return [out / n for n in names] + [out / "tables" / t for t in tables]


def _members(expression: str) -> list[str]:
    from defenses.registry import split_expression

    return split_expression(expression)


#: The figures the mechanism label reads (margin changes in baseline SDs, `probing.analysis.mechanism_label`)
#: and their class-balanced mean, in summary.csv|json after the label (added columns: older readers keep working).
LABEL_FIGURES = ("harmful_change_sd", "benign_change_sd", "differential_sd", "shift_sd")


def summary_row(name: str, kind: str, eff, table: ScoreTable) -> dict:
    """One condition: refusal rates with intervals, mean shift, distance change, AUROC, d', label,
    then the figures the label reads (`LABEL_FIGURES`) with intervals."""
    def est(key):
        e = eff[key]
        return e.value, e.lo, e.hi

    row = {"condition": name, "kind": kind, "n": len(table), "n_harmful": eff.n_harmful, "n_benign": eff.n_benign}
    for col, key in (("refusal_harmful", "refusal_harmful_def"), ("refusal_benign", "refusal_benign_def"),
                     ("mean_shift", "mean_shift"), ("distance_change", "distance_change"),
                     ("auroc", "auroc_def"), ("auroc_change", "auroc_change"),
                     ("dprime", "dprime_def"), ("dprime_change", "dprime_change")):
        v, lo, hi = est(key)
        if name == "baseline" and key in ("mean_shift", "distance_change", "auroc_change", "dprime_change"):
            v = lo = hi = None  # zero by definition
        row[col], row[f"{col}_lo"], row[f"{col}_hi"] = v, lo, hi
    row["label"] = "baseline" if name == "baseline" else eff.label
    for key in LABEL_FIGURES:  # zero by definition for the baseline
        row[key], row[f"{key}_lo"], row[f"{key}_hi"] = (None, None, None) if name == "baseline" else est(key)
    # where the intervals cover less (`DefenseEffect.cautions`); the baseline compared with itself has none
    row["cautions"] = "" if name == "baseline" else "; ".join(eff.cautions)
    return row


def per_dataset_rows(tables: dict[str, ScoreTable]) -> list[dict]:
    """Refusal rate and mean p_refuse per condition, dataset and label."""
    rows = []
    for name, table in tables.items():
        p = table.p_refuse.numpy()
        groups: dict = {}
        for i, (lab, meta) in enumerate(zip(table.labels, table.row_meta)):
            groups.setdefault((meta.get("dataset"), lab), []).append(i)
        for (ds, lab), idx in groups.items():
            rows.append({"condition": name, "dataset": ds, "label": lab, "n": len(idx),
                         "refusal": float(refusal_rate(p[idx])), "mean_p_refuse": float(p[idx].mean())})
    return rows


def tradeoff_rows(cands: list, runs: dict[str, str]) -> list[dict]:
    """`tables/tradeoff.csv`'s rows from `probing.analysis.rank_ensembles`'s candidates; ``runs``
    maps a pair's name to the ensemble's name in the study: a "+" pair's as it was run, a score-level
    pair's canonical one (members in `defenses` order)."""
    return [{"name": c.name, "kind": c.kind, "measured_run": runs.get(c.name),
             "predicted": c.kind not in ("baseline", "single"),
             "safety": c.safety, "helpfulness": c.helpfulness, "utility": c.utility,
             "pareto": c.pareto, "measured_safety": c.measured_safety,
             "measured_helpfulness": c.measured_helpfulness,
             "predicted_safety": c.predicted_safety, "predicted_helpfulness": c.predicted_helpfulness,
             "safety_error": c.safety_error, "helpfulness_error": c.helpfulness_error, "margin_rmse": c.margin_rmse}
            for c in cands]


def tradeoff_points(rows: list[dict], weight: float) -> list[dict]:
    """Plot points from `Study.tradeoff`'s rows, each condition once: every run (baseline, singles,
    run ensembles) as a measured point; every pair that was not run as a predicted point; and a run
    "+" pair's prediction as a predicted point marked ``superseded`` (what the singles predicted,
    shown beside its measurement, left out of both Pareto fronts). A run score-level pair ("|",
    "&", "~") gets no predicted point: the study combines it from its members' tables, the very
    computation its prediction is. Pareto fronts: of the measured points, and of all points that
    are not superseded."""
    from probing.analysis import pareto_mask

    pts = []
    for r in rows:
        measured = r.get("measured_safety") is not None
        if measured:
            pts.append({"name": r["measured_run"] or r["name"], "kind": r["kind"], "measured": True,
                        "superseded": False, "safety": r["measured_safety"], "helpfulness": r["measured_helpfulness"]})
        if r["predicted"] and not (measured and r["kind"] in SCORE_OPS):
            pts.append({"name": r["name"], "kind": r["kind"], "measured": False, "superseded": measured,
                        "safety": r["predicted_safety"], "helpfulness": r["predicted_helpfulness"]})
    for group in ("measured", "all"):
        sel = [p for p in pts if p["measured"] or (group == "all" and not p["superseded"])]
        mask = pareto_mask(np.array([[p["safety"], p["helpfulness"]] for p in sel])) if sel else []
        for p in pts:
            p.setdefault(f"pareto_{group}", None)
        for p, m in zip(sel, mask):
            p[f"pareto_{group}"] = bool(m)
    for p in pts:
        p["utility"] = weight * p["safety"] + (1 - weight) * p["helpfulness"]
    return pts


def run_config(cfg: StudyConfig) -> dict:
    """Run a study from its config (what `mechprobe study` and `mechprobe demo` do). The run
    directory's lock is released on return and on any error or Ctrl-C, so the same process (a
    notebook holding the traceback) can run it again."""
    study = Study(cfg)
    try:
        return study.run_all()
    finally:
        study.close()


def run(args) -> dict:
    cfg = study_config.from_args(args)
    args.out, args.model = cfg.out, cfg.model  # the CLI prints <out>/report.md
    return run_config(cfg)


__all__ = ["Study", "run", "run_config", "stratified_head", "spread_sample", "load_datasets", "register_prompts",
           "condition_dir", "split_top", "LLAVA_V1_SYSTEM"]
