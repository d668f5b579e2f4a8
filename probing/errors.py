"""mechprobe's errors: one base class, one subclass per kind of mistake.

Every error a user can cause is a `MechprobeError`; the CLI turns it into one line
(``mechprobe: error: <message>``) with exit code 2, and library code never raises a bare
``KeyError``, ``RuntimeError`` or ``TypeError`` for a user's mistake. Each message names what
to fix: the query, the file and record, the option or the run directory.

The subclasses also derive from the built-in exception a caller would expect (``ValueError``,
``FileNotFoundError``), so ``except ValueError`` written against earlier versions still works.
"""

from __future__ import annotations

from hooks.errors import HookError, MechprobeError, NotCapturedError

__all__ = ["MechprobeError", "HookError", "NotCapturedError", "InputError", "QueryError", "DataError",
           "MissingDataError", "RunDirError", "ScoringError", "GenerationNeeded"]


class InputError(MechprobeError, ValueError):
    """Raised when an argument, option or parameter is invalid: an unknown model, defense name
    (with a "did you mean"), readout, layer index, or a parameter out of range. Raised before any
    compute; the message names the option or parameter."""


class QueryError(InputError):
    """Raised when a query cannot be scored: no text and no image, a wrong label or type (also of
    ``meta["group"]``, which must be a string or an integer), a duplicate id, an unreadable or oversized image, a prompt longer than the context. The
    message names the query id."""


class DataError(MechprobeError, ValueError):
    """Raised when a dataset file or record cannot be used: invalid JSON or encoding, a record of
    the wrong shape or type, an id repeated across the dataset, a dataset without the labels an
    analysis needs. The message names the file and the record (or line)."""


class MissingDataError(DataError, FileNotFoundError):
    """Raised when a dataset file or image that a run needs does not exist (and missing records
    are not to be skipped). The message names the path(s)."""


class RunDirError(MechprobeError, ValueError):
    """Raised when a run directory cannot be used as asked: it holds a run of another config, a
    foreign folder would be overwritten, another process holds its lock, or a stored shard is
    inconsistent in a way that cannot be recomputed. The message names the path."""


class ScoringError(MechprobeError, RuntimeError):
    """Raised when a forward pass produces something unusable: NaN or infinite scores (checked
    when `RefusalScorer.score`, the prefix-shared paths and `probing.sweep.score_conditions` finish
    a table, and again per shard of a run directory), a token count that does not match the plan.
    The message names the queries and the call (its defense or condition; the shard, when
    resuming)."""


class GenerationNeeded(ScoringError):
    """Raised by `probing.generation.generate` inside `generation_forbidden`: code that must not run
    the model (the study's plan-ahead worker thread, while the main thread scores) reached a
    defense that generates. The study catches it and builds that chunk's plans in the main thread;
    a user sees it only when calling `generate` inside such a block. The message names the first
    query and why generation is forbidden there."""


class UnknownQueryError(QueryError, KeyError):
    """Raised when a ScoreTable is asked for query ids it does not hold. The message names them."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
