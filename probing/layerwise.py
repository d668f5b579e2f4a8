"""Deprecated: moved to `probing.analysis.layers` (import from `probing.analysis`)."""

import warnings

from .analysis.layers import *  # noqa: F401,F403
from .analysis import layers as _moved

warnings.warn("probing.layerwise is deprecated; import from probing.analysis", DeprecationWarning, stacklevel=2)
__all__ = [n for n in dir(_moved) if not n.startswith("_")]
