"""Deprecated: moved to `defenses.composite`."""

import warnings

from .composite import Both, Compose, Either, Mean, ScoreLevel  # noqa: F401

warnings.warn("defenses.ensemble is deprecated; use defenses.composite", DeprecationWarning, stacklevel=2)
