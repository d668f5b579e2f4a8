"""What every experiment shares: options, dataset and model loading, defenses, scoring with resume."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from probing import RefusalScorer, load_model
from probing.runs import RunDir

logger = logging.getLogger(__name__)
DEFAULT_DEFENSES = "sr_self_reminder,qr_caption,ni_image_gaussian,mo_finetune,act_steer,act_ablate"


def add_common(p: argparse.ArgumentParser, name: str, defenses: str | None = DEFAULT_DEFENSES) -> None:
    p.add_argument("--model", default="toy", help="'toy', 'tiny-random' or a llava-hf checkpoint dir / hub id")
    p.add_argument("--dataset", default="toy",
                   help="toy | mossbench:<dir> | mmsafetybench:<dir> | jsonl:<file> (+ ',toy-train' not allowed)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N queries")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--readout", default="first_token", choices=["first_token", "yes_no"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=f"runs/{name}")
    p.add_argument("--overwrite", action="store_true", help="start over instead of resuming")
    if defenses is not None:
        p.add_argument("--defenses", default=defenses, help="comma-separated defense names")


def load_queries(spec: str, limit: int | None = None):
    from probing.datasets import load_jsonl, load_mmsafetybench, load_mossbench
    from probing.datasets import toy

    kind, _, arg = spec.partition(":")
    if kind == "toy":
        queries = toy.requests("test")
    elif kind == "mossbench":
        queries = load_mossbench(arg, skip_missing=True)
    elif kind == "mmsafetybench":
        queries = load_mmsafetybench(arg)
    elif kind == "jsonl":
        queries = load_jsonl(arg)
    else:
        raise ValueError(f"--dataset {spec!r}: use toy, mossbench:<dir>, mmsafetybench:<dir> or jsonl:<file>")
    return queries[:limit] if limit else queries


def config_of(args, name: str) -> dict:
    return {"experiment": name, **{k: v for k, v in vars(args).items() if k not in ("func", "overwrite", "verbose")}}


class Session:
    """One experiment's model, scorer, queries and run directory."""

    def __init__(self, args, name: str, keep_hidden: bool = True):
        self.args = args
        self.run = RunDir(args.out, config_of(args, name), overwrite=args.overwrite)
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
        """A defense by name; activation-level ones use the baseline run for their direction."""
        from defenses import act_ablate, act_steer, get_defense

        if name == "act_steer":
            return act_steer(self.baseline, alpha=1.0)
        if name == "act_ablate":
            n = self.bundle.n_layers
            return act_ablate(self.baseline, layers=list(range(1, max(2, n - 1))))
        return get_defense(name)

    def report(self, title: str, sections: list[tuple[str, str]]) -> Path:
        lines = [f"# {title}", "", f"Config: `{self.run.path / 'config.json'}`", ""]
        for head, body in sections:
            lines += [f"## {head}", "", body, ""]
        path = self.run.path / "report.md"
        path.write_text("\n".join(lines))
        return path
