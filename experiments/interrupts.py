"""Ctrl-C that a finalizer cannot swallow.

Python raises KeyboardInterrupt in whatever the main thread is running when SIGINT arrives. When
that is a finalizer (an object's ``__del__``, a weakref callback; tqdm's ``__del__`` after every
scoring loop, for one), Python reports the exception as "ignored" with a traceback on stderr and
carries on: the run would go on as if no key had been pressed, and end with exit code 0 (seen
once in CI). `remembered` (the CLI wraps each command in it) installs a SIGINT handler that also
remembers the signal, and `check` raises KeyboardInterrupt again where the first one was
swallowed: `experiments.runs.RunDir.score` calls it before every shard, the CLI after the
command. The swallowed report itself is silenced (the interrupt is not lost: it is raised again).

Outside `remembered` (a library user's own code) `check` does nothing.
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

_pending = False


def _on_sigint(signum, frame) -> None:
    global _pending
    _pending = True
    raise KeyboardInterrupt


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed inside `remembered` (also when the first
    KeyboardInterrupt was swallowed by a finalizer)."""
    if _pending:
        raise KeyboardInterrupt


@contextmanager
def remembered() -> Iterator[None]:
    """Within the block, Ctrl-C is remembered as well as raised (see the module docstring). Only
    where Python's own SIGINT handler is in force, in the main thread: an ignored SIGINT (a job
    started in the background) stays ignored."""
    global _pending
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    previous_hook = sys.unraisablehook

    def hook(unraisable) -> None:
        if _pending and unraisable.exc_type is KeyboardInterrupt:
            return  # our Ctrl-C, swallowed by a finalizer: remembered, `check` raises it again
        previous_hook(unraisable)

    signal.signal(signal.SIGINT, _on_sigint)
    sys.unraisablehook = hook
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.unraisablehook = previous_hook
        _pending = False
