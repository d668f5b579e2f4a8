"""What every experiment shares: options, dataset and model loading, defenses, scoring with resume."""

from __future__ import annotations

import logging
from pathlib import Path

from probing import RefusalScorer, load_model
from .options import ANALYSIS_OPTIONS, add_common  # noqa: F401  (add_common: old import path)
from .report import write_report
from .runs import RunDir

logger = logging.getLogger(__name__)

def load_queries(spec: str, limit: int | None = None):
    from probing.datasets import load_jsonl, load_mmsafetybench, load_mossbench
    from probing.datasets import toy

    kind, _, arg = spec.partition(":")
    if kind == "toy":
        queries = toy.requests("test")
    elif kind == "mossbench":
        queries = load_mossbench(arg, skip_missing=True)
    elif kind == "mmsafetybench":
        queries = load_mmsafetybench(arg, skip_missing=True)
    elif kind == "jsonl":
        queries = load_jsonl(arg)
    else:
        raise ValueError(f"--dataset {spec!r}: use toy, mossbench:<dir>, mmsafetybench:<dir> or jsonl:<file>")
    return queries[:limit] if limit else queries


def config_of(args, name: str) -> dict:
    """Every option of the run (config.json); the analysis-only ones do not identify it."""
    return {"experiment": name, **{k: v for k, v in vars(args).items() if k not in ("func", "verbose", "overwrite")}}


class Session:
    """One experiment's model, scorer, queries and run directory."""

    def __init__(self, args, name: str, keep_hidden: bool = True):
        self.args = args
        self.run = RunDir(args.out, config_of(args, name), overwrite=args.overwrite, ignore=ANALYSIS_OPTIONS)
        self.queries = load_queries(args.dataset, args.limit)
        self.bundle = load_model(args.model, device=args.device, dtype=args.dtype)
        self.scorer = RefusalScorer(self.bundle, args.readout, keep_hidden=keep_hidden, batch_size=args.batch_size,
                                    progress=False)
        self._baseline = None

    def score(self, condition: str, defense=None, queries=None):
        queries = self.queries if queries is None else queries
        return self.run.score(lambda qs: self.scorer.score(qs, defense=defense, meta={"condition": condition}),
                              queries, condition, self.args.batch_size)

    @property
    def baseline(self):
        if self._baseline is None:
            self._baseline = self.score("baseline")
        return self._baseline

    def defense(self, name: str):
        """A defense by name or expression; activation-level ones read the baseline run."""
        from defenses import get_defense, registry

        needs = any(registry.needs_baseline(registry.REGISTRY[p]) for p in registry.split_expression(name)
                    if p in registry.REGISTRY)
        return get_defense(name, baseline=self.baseline if needs else None)

    def report(self, title: str, sections: list[tuple[str, str]]) -> Path:
        return write_report(self.run.path / "report.md", title, sections,
                            preface=f"Config: `{self.run.path / 'config.json'}`")
