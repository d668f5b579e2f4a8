"""What every experiment shares: options, dataset and model loading, defenses, scoring with resume.

`Session` checks everything a run needs before the first forward pass, cheapest first: options
and defense names (with "did you mean"), the model (name or path, offline, without loading it),
the dataset (files, records, ids unique over all of it, both labels present), then the run
directory (ownership, fingerprint, lock); only then is the model loaded.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from probing import RefusalScorer, load_model
from probing.errors import DataError, InputError
from probing.analysis.folds import groups_per_class
from probing.query import GROUP, Query, check_images
from defenses.registry import split_top  # noqa: F401 (re-exported: the study imports it from here)
from .kept import kept
from .options import ANALYSIS_OPTIONS, add_common  # noqa: F401  (add_common: old import path)
from .report import write_report
from .runs import RunDir

logger = logging.getLogger(__name__)

DATASET_KINDS = ("toy", "mossbench", "mmsafetybench", "jsonl")
LABELS_NEEDED = ("harmful", "benign")
#: Ensemble operators the ensembles experiment can measure.
ENSEMBLE_OPS = ("+", "|")


def _load_one(spec: str):
    from probing.datasets import load_jsonl, load_mmsafetybench, load_mossbench
    from probing.datasets import toy

    kind, _, arg = spec.partition(":")
    if kind == "toy" and not arg:
        return toy.requests("test")
    if kind in ("mossbench", "mmsafetybench", "jsonl") and arg.strip():
        # mmsafetybench:<dir> means what it means to `study` (study_config.parse_dataset_flag): the
        # official tiny subset, SD_TYPO, requests whose images are present
        loader = {"mossbench": lambda a: load_mossbench(a, skip_missing=True),
                  "mmsafetybench": lambda a: load_mmsafetybench(a, subset="tiny", skip_missing=True),
                  "jsonl": load_jsonl}[kind]
        return loader(arg)
    raise InputError(f"--dataset {spec!r}: use toy, mossbench:<dir>, mmsafetybench:<dir> or jsonl:<file> "
                     f"(several joined by ',')")


def split_dataset_spec(spec: str) -> list[str]:
    """``"jsonl:a.jsonl,toy"`` -> two specs; a comma inside a path stays when the rest is no spec."""
    parts = spec.split(",")
    if len(parts) > 1 and all(p.partition(":")[0] in DATASET_KINDS for p in parts):
        return parts
    return [spec]


def stratified_head(queries: list[Query], limit: int | None) -> list[Query]:
    """The first ``limit`` queries, stratified by label where both harmful and benign occur:
    each label keeps its share (largest remainder, at least one each), the first ones of each
    label in the dataset's order, returned in that order."""
    if limit is None or limit >= len(queries):
        return list(queries)
    by: dict = {}
    for i, q in enumerate(queries):
        by.setdefault(q.label, []).append(i)
    if not ("harmful" in by and "benign" in by):
        return list(queries[:limit])
    exact = {lab: limit * len(ix) / len(queries) for lab, ix in by.items()}
    take = {lab: min(len(by[lab]), max(1, math.floor(v))) for lab, v in exact.items()}
    while sum(take.values()) > limit:
        take[max(take, key=lambda lab: take[lab])] -= 1
    while sum(take.values()) < limit:
        open_ = [lab for lab in take if take[lab] < len(by[lab])]
        take[max(open_, key=lambda lab: exact[lab] - take[lab])] += 1
    keep = sorted(i for lab, ix in by.items() for i in ix[:take[lab]])
    return [queries[i] for i in keep]


def load_queries(spec: str, limit: int | None = None) -> list[Query]:
    """The queries of ``--dataset`` (one spec or several joined by ','), checked (see `check_queries`);
    with ``limit`` (>= 1; None for all) the first ``limit`` of each spec, stratified by label
    (`stratified_head`), as the study takes them: MOSSBench lists its benign records first, so a
    plain head would hold one class only."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InputError(f"--limit must be an integer >= 1 (or absent for all queries), got {limit!r}")
    sources = [(part, _load_one(part)) for part in split_dataset_spec(spec)]
    return check_queries([(part, stratified_head(queries, limit)) for part, queries in sources])


def check_queries(sources: list[tuple[str, list]]) -> list[Query]:
    """Concatenate ``(source name, queries)`` lists, checking each is a `Query` and every id is unique
    over all of them (the error names both places)."""
    out, first = [], {}
    for name, queries in sources:
        if not queries:
            raise DataError(f"--dataset {name}: no queries")
        for i, q in enumerate(queries, 1):
            if not isinstance(q, Query):
                raise DataError(f"--dataset {name}: record {i} is a {type(q).__name__}, not a Query")
            if q.id in first:
                where, j = first[q.id]
                raise DataError(f"--dataset: query id {q.id!r} appears twice: {where} record {j} and {name} record "
                                f"{i}; ids pair runs across defenses and must be unique")
            first[q.id] = (name, i)
            out.append(q)
    return out


def check_labels(queries: list[Query], spec: str, limit: int | None = None) -> None:
    """Both classes must be present: every experiment compares harmful with benign queries."""
    counts = {lab: sum(q.label == lab for q in queries) for lab in LABELS_NEEDED}
    missing = [lab for lab, n in counts.items() if n == 0]
    if missing:
        unlabelled = sum(q.label is None for q in queries)
        within = f" within --limit {limit}" if limit is not None else ""
        raise DataError(f"--dataset {spec}: no {' and no '.join(missing)} queries{within} ({counts['harmful']} harmful, "
                        f"{counts['benign']} benign, {unlabelled} unlabelled); the analysis compares harmful with "
                        f"benign, so both labels are needed")


#: the per-layer scores read from hidden states, cross-fitted in folds (`probing.analysis.layer_profile`)
HIDDEN_SCORES = ("diffmean", "probe")
#: why a score-level ensemble gets no diffmean / probe profile (the study and `layerwise` say the same)
NO_HIDDEN_SCORE_LEVEL = "a score-level ensemble, combined from its members' scores, has no hidden states"


def is_score_level(expression: str) -> bool:
    """Whether a condition is a score-level ensemble ("a|b", "a&b", "a~b"): combined from its
    members' tables, so it has scores but no hidden states."""
    from probing.aggregate import OPERATORS

    return split_top(expression)[0] in OPERATORS


def check_layer_folds(queries: list[Query], scores, folds: int, option: str, remedy: str) -> None:
    """The diffmean / probe layer scores are cross-fitted in ``folds`` stratified folds, so they need
    ``folds`` >= 2 and at least ``folds`` request groups holding each class. Checked from the queries' labels
    before any forward (`probing.analysis.layer_profile` would only find out after scoring);
    ``option`` names the setting in the message ("--folds", "<config>: 'folds'"), ``remedy`` says
    what to change. Nothing to check when only ``lens`` is asked for."""
    if not any(s in HIDDEN_SCORES for s in scores):
        return
    if folds < 2:
        raise InputError(f"{option} = {folds}: the diffmean / probe layer scores are cross-fitted and need at "
                         f"least 2 folds; {remedy}")
    # folds deal whole request groups (probing.analysis.folds), so the count is of groups
    counts = groups_per_class([q.id for q in queries], [q.label for q in queries],
                              [q.meta.get(GROUP) for q in queries])
    smaller = min(LABELS_NEEDED, key=lambda lab: counts.get(lab, 0))
    if counts.get(smaller, 0) < folds:
        raise InputError(f"{option} = {folds} for the diffmean / probe layer scores, but only "
                         f"{counts.get(smaller, 0)} request group(s) hold {smaller} queries (a group: the deliveries "
                         f"of one request, meta 'group'); {remedy}")


def check_defenses(args) -> list[str]:
    """Every name in ``--defenses`` exists (with "did you mean"); returns the list."""
    spec = getattr(args, "defenses", None)
    if spec is None:
        return []
    from defenses import check_names

    names = [n.strip() for n in spec.split(",") if n.strip()]
    for name in names:
        try:
            check_names(name)
        except InputError as exc:
            raise InputError(f"--defenses: {exc}") from None
    ops = getattr(args, "ops", None)
    if ops is not None:
        bad = [o for o in ops.split(",") if o and o not in ENSEMBLE_OPS]
        if bad:
            raise InputError(f"--ops: unknown operator(s) {bad}; choose from {list(ENSEMBLE_OPS)}")
    return names


def check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise InputError(f"--device {device!r}: not a device (cpu, cuda, cuda:0, mps ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device is available here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {device}: MPS is not available here; use --device cpu")


def config_of(args, name: str) -> dict:
    """Every option of the run (config.json), to repeat it."""
    return {"experiment": name, **{k: v for k, v in vars(args).items() if k not in ("func", "verbose", "overwrite")}}


def run_fingerprint(args, name: str, keep_hidden: bool) -> dict:
    """What identifies the scores of every condition of a run: the model (see
    `probing.model.model_fingerprint`; validates it, fast and offline), the readout, the prompt
    format and what the shards hold. Not: the dataset (each shard checks its own queries),
    analysis options, --out, the defenses listed."""
    from probing.model import model_fingerprint
    from probing.readout import get_readout

    readout = get_readout(args.readout)
    return {"experiment": name, **model_fingerprint(args.model, dtype=args.dtype, device=args.device,
                                                    image_aspect_ratio=args.image_aspect_ratio),
            "readout": {"name": readout.name, "question": readout.question,
                        "refusal_words": list(readout.refusal_words), "comply_words": list(readout.comply_words)},
            "keep_hidden": keep_hidden}


def _needs_baseline(defense) -> bool:
    from defenses import registry

    name = getattr(defense, "name", defense)
    return isinstance(name, str) and any(
        registry.needs_baseline(registry.REGISTRY[p]) for p in registry.split_expression(name)
        if p in registry.REGISTRY)


class Session:
    """One experiment's model, scorer, queries and run directory, all checked before any forward."""

    def __init__(self, args, name: str, keep_hidden: bool = True, check=None):
        """``check(queries)``: the experiment's own checks of the loaded queries (folds against class
        sizes, deliveries present ...), run with the others, before the run directory is opened
        and the model loaded."""
        self.args = args
        self.defense_names = check_defenses(args)
        if args.batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
        check_device(args.device)
        fingerprint = run_fingerprint(args, name, keep_hidden)  # the model name, checked without loading
        # the model's part of it: kept with a saved fine-tune and cached generations (experiments.kept)
        self.model_identity = {k: v for k, v in fingerprint.items() if k not in ("experiment", "readout", "keep_hidden")}
        self.queries = load_queries(args.dataset, args.limit)
        check_labels(self.queries, args.dataset, args.limit)
        check_images(self.queries)
        if check is not None:
            check(self.queries)
        warn_out_of_vocabulary(self.queries, args.model)
        self.run = RunDir(args.out, config_of(args, name), overwrite=args.overwrite, ignore=ANALYSIS_OPTIONS,
                          fingerprint=fingerprint)
        try:
            self.bundle = load_model(args.model, device=args.device, dtype=args.dtype,
                                     image_aspect_ratio=args.image_aspect_ratio)
            self.scorer = RefusalScorer(self.bundle, args.readout, keep_hidden=keep_hidden,
                                        batch_size=args.batch_size, progress=False)
        except BaseException:
            self.run.close()
            raise
        self._baseline = None
        self._defenses: dict = {}

    def close(self) -> None:
        """Release the run directory's lock."""
        self.run.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def score(self, condition: str, defense=None, queries=None):
        queries = self.queries if queries is None else queries
        fp = {"defense": defense.describe() if hasattr(defense, "describe") else defense}
        if defense is not None and _needs_baseline(defense):
            fp["baseline"] = self.run.condition_digest("baseline")
        return self.run.score(lambda qs: self.scorer.score(qs, defense=defense, meta={"condition": condition}),
                              queries, condition, self.args.batch_size, fingerprint=fp)

    @property
    def baseline(self):
        if self._baseline is None:
            self._baseline = self.score("baseline")
        return self._baseline

    def defense(self, name: str):
        """A defense by name or expression; each single defense is built once per session and
        shared by the expressions that name it (activation-level ones read the baseline run). A
        fine-tune is trained once and saved in the run directory, a rewrite's generations cached
        there (`experiments.kept`), so an ensemble and a resumed run reuse them."""
        from defenses import get_defense

        return get_defense(name, member=self._single)

    def _single(self, name: str):
        if name not in self._defenses:
            from defenses import get_defense

            d = get_defense(name, baseline=self.baseline if _needs_baseline(name) else None)
            self._defenses[name] = kept(d, self.run.path, name, self.bundle.name, device=self.args.device,
                                        dtype=self.args.dtype, base=self.model_identity)
        return self._defenses[name]

    def clear_outputs(self, tables: tuple[str, ...] = (), figures: tuple[str, ...] = ()) -> None:
        """Remove what the experiment derives from its scores before writing it again: report.md,
        ``tables/<name>.csv|json`` of each of ``tables`` and each of ``figures``. A figure an
        earlier run wrote under other options (layerwise's ``layers_probe.png`` after a rerun
        without ``--scores probe``) would otherwise stay beside the new report, and in the CLI's
        list of what was written. Nothing else in the run directory is touched (the study does the
        same: `experiments.study.derived_outputs`)."""
        out = self.run.path
        paths = [out / "report.md", *(out / f for f in figures)]
        paths += [out / "tables" / f"{t}.{ext}" for t in tables for ext in ("csv", "json")]
        for path in paths:
            path.unlink(missing_ok=True)

    def report(self, title: str, sections: list[tuple[str, str]]) -> Path:
        return write_report(self.run.path / "report.md", title, sections,
                            preface=f"Config: `{self.run.path / 'config.json'}`")


def warn_out_of_vocabulary(queries: list[Query], model: str, share: float = 0.5) -> int:
    """For the toy, log a warning naming the queries most of whose words it never saw in training
    (its answers to them mean little: docs/toy.md lists what it knows). Returns how many."""
    if str(model) != "toy":
        return 0
    from probing.datasets.toy import out_of_vocabulary_share

    strange = [q.id for q in queries if q.text and out_of_vocabulary_share(q.text) > share]
    if strange:
        logger.warning("%d of %d queries are mostly outside the toy's vocabulary (e.g. %s): the toy knows only its "
                       "synthetic activities and words (docs/toy.md), so its scores on them mean little",
                       len(strange), len(queries), ", ".join(repr(s) for s in strange[:3]))
    return len(strange)
