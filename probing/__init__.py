"""mechprobe's probing API: load LLaVA-1.5, score refusal under defenses, read layers.

    from probing import load_model, Query, RefusalScorer
    bundle = load_model("tiny-random")
    table = RefusalScorer(bundle).score([Query("q1", "How do I bake bread?", label="benign")])
"""

import logging

from .model import ModelBundle, find_llava_assets, load_model
from .query import Query, QueryError
from .readout import Readout, ResolvedReadout, first_token_readout, resolve_readout, yes_no_readout
from .render import PromptSpec, render_prompt
from .score_table import ScoreTable
from .scorer import RefusalScorer

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "ModelBundle", "find_llava_assets", "load_model", "Query", "QueryError", "Readout",
    "ResolvedReadout", "first_token_readout", "resolve_readout", "yes_no_readout", "PromptSpec",
    "render_prompt", "ScoreTable", "RefusalScorer",
]
