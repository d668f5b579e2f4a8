"""Deprecated: a defense now turns queries into a `probing.plan.ScoringPlan` that the scorer runs."""

import warnings

from probing.plan import fold_variants, run_plan  # noqa: F401

warnings.warn("defenses.apply is deprecated; use scorer.score(queries, defense=...)", DeprecationWarning,
              stacklevel=2)


def score_defended(scorer, queries, defense, *, prompt=None, meta=None, desc="scoring"):
    """Deprecated alias of ``scorer.score(queries, defense=defense, ...)``."""
    from probing.render import PromptSpec

    return scorer.score(list(queries), defense=defense, prompt=prompt or PromptSpec(), meta=meta, desc=desc)
