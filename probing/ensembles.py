"""Deprecated: moved to `probing.analysis.prediction` (import from `probing.analysis`)."""

import warnings

from .analysis.prediction import *  # noqa: F401,F403
from .analysis import prediction as _moved

warnings.warn("probing.ensembles is deprecated; import from probing.analysis", DeprecationWarning, stacklevel=2)
__all__ = [n for n in dir(_moved) if not n.startswith("_")]
