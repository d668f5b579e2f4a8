"""Deprecated: moved to `probing.analysis.metrics` (import from `probing.analysis`)."""

import warnings

from .analysis.metrics import *  # noqa: F401,F403
from .analysis import metrics as _moved

warnings.warn("probing.metrics is deprecated; import from probing.analysis", DeprecationWarning, stacklevel=2)
__all__ = [n for n in dir(_moved) if not n.startswith("_")]
