"""Ctrl-C that a finalizer cannot swallow, and SIGTERM that releases the run directory's lock.

Python raises KeyboardInterrupt in whatever the main thread is running when SIGINT arrives. When
that is a finalizer (an object's ``__del__``, a weakref callback; tqdm's ``__del__`` after every
scoring loop, for one), Python reports the exception as "ignored" with a traceback on stderr and
carries on: the run would go on as if no key had been pressed, and end with exit code 0 (seen
once in CI). `remembered` (the CLI wraps each command in it) installs a SIGINT handler that also
remembers the signal, and `check` raises KeyboardInterrupt again where the first one was
swallowed: `experiments.runs.RunDir.score` calls it before every shard, the CLI after the
command. The swallowed report itself is silenced (the interrupt is not lost: it is raised again).

SIGTERM (a SLURM time limit, ``kill``, ``docker stop``) kills a Python process at once by
default: no ``finally`` runs, so the run directory's ``.lock`` stays, and a run resumed from
another host of a shared filesystem is refused until the user deletes it. While a run directory
holds its lock (`hold_sigterm` / `release_sigterm`, called by `experiments.runs.RunDir`), SIGTERM
raises `Terminated`, a KeyboardInterrupt, so it takes Ctrl-C's way out: every ``finally`` runs,
the lock is released, the CLI prints one line and exits 143 (128 + SIGTERM, what a shell reports
for a process SIGTERM killed). A second SIGTERM while the first is being handled, or one when no
lock is held, has the default action.

Outside `remembered` (a library user's own code) `check` raises only a SIGTERM's `Terminated`.
Signal handlers can be set only in the main thread; elsewhere nothing is installed.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

#: the interruption to raise again at `check` (KeyboardInterrupt or Terminated), None when none
_pending: type[KeyboardInterrupt] | None = None
_remembering = False
_held = 0  # run directories holding their lock with the SIGTERM handler in force


class Terminated(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM while a run directory holds its lock (see the module
    docstring): a KeyboardInterrupt, so whatever cleans up after Ctrl-C cleans up after it."""


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _on_sigint(signum, frame) -> None:
    global _pending
    _pending = KeyboardInterrupt
    raise KeyboardInterrupt


def _on_sigterm(signum, frame) -> None:
    global _pending
    if _held == 0 or _pending is Terminated:  # no run to close, or asked twice: the default action
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    _pending = Terminated
    raise Terminated


def check() -> None:
    """Raise the interruption again if Ctrl-C was pressed inside `remembered`, or SIGTERM arrived
    while a run directory held its lock (also when the first one was swallowed by a finalizer)."""
    if _pending is not None:
        raise _pending


def hold_sigterm() -> bool:
    """Install the SIGTERM handler for a run directory that has just taken its lock (counted:
    nested run directories share it). Returns whether it holds it, so that `release_sigterm` is
    called once for it: False off the main thread, and where SIGTERM's action is not the default
    one (a handler of the caller's own, or SIGTERM ignored: left as it is)."""
    global _held, _pending
    if not _main_thread():
        return False
    if _held == 0:
        if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, _on_sigterm):
            return False
        signal.signal(signal.SIGTERM, _on_sigterm)
        if _pending is Terminated and not _remembering:
            _pending = None  # a library caller that handled an earlier SIGTERM and carried on
    _held += 1
    return True


def release_sigterm() -> None:
    """The run directory released its lock: with the last one, SIGTERM's default action comes
    back (off the main thread the handler stays, acting as the default while no lock is held)."""
    global _held
    _held = max(0, _held - 1)
    if _held == 0 and _main_thread() and signal.getsignal(signal.SIGTERM) is _on_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextmanager
def remembered() -> Iterator[None]:
    """Within the block, Ctrl-C is remembered as well as raised (see the module docstring). Only
    where Python's own SIGINT handler is in force, in the main thread: an ignored SIGINT (a job
    started in the background) stays ignored."""
    global _pending, _remembering
    if not _main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    previous_hook = sys.unraisablehook

    def hook(unraisable) -> None:
        if _pending is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            return  # our interruption, swallowed by a finalizer: remembered, `check` raises it again
        previous_hook(unraisable)

    signal.signal(signal.SIGINT, _on_sigint)
    sys.unraisablehook = hook
    _remembering = True
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.unraisablehook = previous_hook
        _pending, _remembering = None, False
