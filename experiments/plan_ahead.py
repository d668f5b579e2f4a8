"""The study's plan-ahead worker: chunk k+1's scoring plans are built while chunk k is scored.

Building a chunk's plans is host work the device would otherwise wait for: noise injection draws
K perturbed copies of every image (~50-90 ms a copy of a 1024 px image on one core), SR and QR
defenses render their text, and every image of the chunk (the copies included) must go through
the image processor. `PlanAhead` runs that for the next chunk in one background thread
while the main thread scores the current one, so the device keeps working.

The worker must not enter the model: the scorer's hooks and the image-feature cache belong to the
main thread's forward. So it builds under `probing.generation.generation_forbidden`; a plan that
needs generation (a caption not yet in the run's cache) raises `GenerationNeeded` there, and that
chunk's plans are built again in the main thread (`fallbacks` counts how often). The study
generates every caption up front (`Study.prepare_generations`), so that happens only when a
rewrite cannot be cached.

Plans are the same whichever thread builds them: every defense's randomness comes from (seed,
query id), never from the order of calls (tests/test_plan_ahead.py compares the tables).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Hashable

from probing.errors import GenerationNeeded
from probing.generation import generation_forbidden

logger = logging.getLogger(__name__)


class PlanAhead:
    """``build(names, chunk)`` for the next chunk in one worker thread (see the module docstring).

    `submit` starts the next chunk's build (replacing one not taken), `take` returns a chunk's
    plans: the worker's if it built that chunk for the same names, else built here. ``discard``
    is called with a finished build nobody takes (the study unstages its images). Use it as a
    context manager: `close` waits for a running build and stops the thread, also after an error
    or Ctrl-C, so no thread outlives the block. ``enabled=False`` builds everything in `take`.

    Attributes:
        wait_s: seconds `take` waited for the worker.
        inline_s: seconds `take` spent building plans itself (no build ahead, or a fallback).
        fallbacks: builds the worker gave up because they needed generation.
    """

    def __init__(self, build: Callable[[list[str], list], object], enabled: bool = True,
                 discard: Callable[[object], None] | None = None):
        self.build, self.discard = build, discard
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mechprobe-plan") if enabled else None
        self._pending: tuple[Hashable, tuple[str, ...], Future] | None = None
        self.wait_s = self.inline_s = 0.0
        self.fallbacks = 0

    def _build_without_model(self, names: list[str], chunk: list) -> object:
        with generation_forbidden("the study's plan-ahead worker builds plans while the model scores"):
            return self.build(names, chunk)

    def submit(self, key: Hashable, names: list[str], chunk: list) -> None:
        """Start building ``chunk``'s plans for ``names`` in the worker."""
        if self._pool is None or not names:
            return
        self._drop()
        self._pending = (key, tuple(names), self._pool.submit(self._build_without_model, list(names), list(chunk)))

    def _drop(self) -> None:
        """Forget the pending build, after it has finished (so no two builds ever run at once)."""
        if self._pending is not None:
            _, _, future = self._pending
            self._pending = None
            if not future.cancel():
                try:
                    built = future.result()
                except Exception:  # noqa: BLE001 -- an unwanted build's error is nobody's concern
                    return
                if self.discard is not None:
                    self.discard(built)

    def take(self, key: Hashable, names: list[str], chunk: list) -> object:
        """``build(names, chunk)``: the worker's result when it built exactly this one."""
        if self._pending is not None and self._pending[:2] == (key, tuple(names)):
            _, _, future = self._pending
            self._pending = None
            t0 = time.perf_counter()
            try:
                plans = future.result()
                self.wait_s += time.perf_counter() - t0
                return plans
            except GenerationNeeded as exc:
                self.wait_s += time.perf_counter() - t0
                self.fallbacks += 1
                logger.info("plans of chunk %s built in the main thread: %s", key, exc)
        self._drop()
        t0 = time.perf_counter()
        try:
            return self.build(list(names), list(chunk))
        finally:
            self.inline_s += time.perf_counter() - t0

    def close(self) -> None:
        self._drop()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "PlanAhead":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
