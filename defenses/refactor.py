"""Deprecated: query rewriting moved to `defenses.rewriting` (and `generate` to `probing.generation`)."""

import warnings

from probing.generation import generate  # noqa: F401

from .rewriting import *  # noqa: F401,F403
from .rewriting import (CAPTION_QUESTION, INTENT_QUESTION, REWRITE_QUESTION, AskFirst, Caption,  # noqa: F401
                        Intention, Rewrite, qr_caption, qr_caption_no_image, qr_intention, qr_rewrite)

warnings.warn("defenses.refactor is deprecated; use defenses.rewriting", DeprecationWarning, stacklevel=2)
