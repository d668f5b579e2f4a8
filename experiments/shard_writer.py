"""The study's shard writer: a scored chunk's tables are folded and stored in the background.

After the query-major pass scores a chunk, every condition's rows are folded into its table and
stored as a shard (`RunDir.store_shard`: safetensors, JSON, checksums). In the main thread that
is host work between two chunks, while the device waits (on an H200, ~0.7 s of a 23 s study).
`ShardWriter` runs it in one background thread while the main thread starts the next chunk.

Nothing is lost on interruption: leaving the block waits for every submitted store, also when
the block ends by an error or Ctrl-C (`close`). A store's own error is raised in the main thread
by the next `flush` (or by `close` when the block ended normally); when the block is already
ending by another exception, the store's error is logged and the original exception goes on.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

logger = logging.getLogger(__name__)


class ShardWriter:
    """``submit(fn)`` runs ``fn()`` in one background thread, in submission order; `flush` waits
    for all of them and raises the first error. Use it as a context manager (see the module
    docstring).

    Attributes:
        wait_s: seconds `flush` waited for the writer.
    """

    def __init__(self):
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(1, thread_name_prefix="mechprobe-shards")
        self._pending: list[Future] = []
        self.wait_s = 0.0

    def submit(self, fn: Callable[[], None]) -> None:
        if self._pool is None:
            raise RuntimeError("the shard writer is closed")
        self._pending.append(self._pool.submit(fn))

    def flush(self) -> None:
        """Wait for every submitted store; raise the first one's error."""
        pending, self._pending = self._pending, []
        t0 = time.perf_counter()
        try:
            errors = [f.exception() for f in pending]
        finally:
            self.wait_s += time.perf_counter() - t0
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first

    def close(self, ending_by_error: bool = False) -> None:
        try:
            self.flush()
        except Exception:
            if not ending_by_error:
                raise
            logger.exception("a shard store failed while the study was stopping")
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(ending_by_error=exc_type is not None)
