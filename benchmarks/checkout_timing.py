"""What the host-timing scripts share (`chunk_boundary.py`, `generation_ahead.py`): options to time
another checkout's code, importing that checkout first, and marks on the functions they time."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared"


def add_checkout_arguments(p, runs: int, queries: int) -> None:
    """``--root`` (the checkout whose code is timed), ``--runs``, ``--queries``, ``--mmsb``."""
    p.add_argument("--root", default=str(HERE.parent), help="the checkout whose code is timed (default: this one)")
    p.add_argument("--runs", type=int, default=runs)
    p.add_argument("--queries", type=int, default=queries,
                   help="toy queries (the MM-SafetyBench subset comes on top)")
    p.add_argument("--mmsb", default=str(SHARED / "data" / "mm-safetybench"))


def use_checkout(root: str) -> str:
    """Import ``root``'s modules first and this folder's helpers (gpu_study, bench_scorer) after
    them; stop if the study module still comes from elsewhere. Returns the resolved root."""
    root = str(Path(root).resolve())
    sys.path[:0] = [root, str(HERE)]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MECHPROBE_LLAVA_DIR", str(SHARED / "llava-1.5-7b-hf"))
    import experiments.study as study_mod

    if not study_mod.__file__.startswith(root):
        raise SystemExit(f"imported {study_mod.__file__}, not the code under {root}")
    return root


class Marks(list):
    """``(tag, time)`` events, appended by the functions `mark` wraps."""

    def mark(self, owner, name: str, tag: str, after: str | None = None) -> None:
        """Replace ``owner.name`` by a wrapper that records ``tag`` when called (and ``after``
        when it returns, if given)."""
        real = getattr(owner, name)

        def wrapper(*a, **k):
            self.append((tag, time.perf_counter()))
            try:
                return real(*a, **k)
            finally:
                if after:
                    self.append((after, time.perf_counter()))
        setattr(owner, name, wrapper)


def gap_cells(gaps: list[float], digits: int) -> str:
    """Table cells: every gap in ms, then their mean without the first (nothing runs ahead of
    the first chunk or batch)."""
    rest = gaps[1:] or gaps
    return f"{', '.join(f'{g * 1e3:.{digits}f}' for g in gaps)} | {sum(rest) / len(rest) * 1e3:.{digits}f}"
