"""Capturing and editing LLaVA activations at TransformerLens-named hook points.

    from hooks import capture, edit, hook_name
"""

from .capture import ActivationCache, EditContext, capture, edit
from .points import KINDS, HookPoint, hook_name, parse_hook_name
from .positions import ALL, DECISION, AllPositions, Decision, Explicit, LastK, as_positions

__all__ = [
    "ActivationCache", "EditContext", "capture", "edit",
    "KINDS", "HookPoint", "hook_name", "parse_hook_name",
    "ALL", "DECISION", "AllPositions", "Decision", "Explicit", "LastK", "as_positions",
]
