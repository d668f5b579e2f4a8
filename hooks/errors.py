"""The root of mechprobe's error hierarchy, defined in the lowest layer so every layer can use it.

`probing.errors` re-exports `MechprobeError` and adds the input, data, run-directory and scoring
subclasses; this module holds only what the hooks raise themselves.
"""


class MechprobeError(Exception):
    """Base class of every error mechprobe raises for a user's input, data or run directory."""


class HookError(MechprobeError, ValueError):
    """Raised when a hook point, position selector or edit is invalid: an unknown hook name, a
    layer out of range, a model without recognisable decoder layers, positions a row cannot
    provide, hook names that are not strings, edits that are not a dict of functions, an edit
    function that returns the wrong shape, a read of a name never captured, or a read that would
    join captured forwards of different lengths (read them one forward at a time). The message
    names the hook point or selector."""


class NotCapturedError(HookError, KeyError):
    """Raised when an `ActivationCache` is read at a hook name that captured nothing."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
