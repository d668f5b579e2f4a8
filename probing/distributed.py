"""Data-parallel scoring on Hugging Face accelerate: one process per device, shards merged on rank 0.

    accelerate launch --multi_gpu --num_processes 4 -m probing.cli score --queries q.jsonl --out runs/x
    torchrun --nproc_per_node 2 -m probing.cli score ...            # what accelerate runs; CPU too (gloo)

(accelerate's own launcher starts several CPU processes only through MPI; torchrun does it
directly, which is how the two-process CPU test runs.)

Each process scores a contiguous shard of the queries into ``<out>/.shards/rank<k>/``; after a
barrier, rank 0 concatenates the shards in input order into ``<out>/`` and removes them. Scores
are per query and batch-invariant, so the merged table equals a single-process run.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Sequence

from .query import Query
from .score_table import ScoreTable

logger = logging.getLogger(__name__)


def is_distributed_launch() -> bool:
    """True when started by accelerate / torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_state(cpu: bool = False):
    """accelerate's PartialState (initialises the process group: NCCL on GPUs, gloo on CPU)."""
    from accelerate import PartialState

    return PartialState(cpu=cpu)


def score_sharded(
    score: Callable[[list[Query]], ScoreTable],
    queries: Sequence[Query],
    out: str | os.PathLike,
    state=None,
) -> ScoreTable | None:
    """Score this process's shard with ``score`` and merge on rank 0.

    Returns the merged table on rank 0 and None elsewhere. With one process it simply scores
    everything and saves it.
    """
    out = Path(out)
    queries = list(queries)
    if state is None or state.num_processes == 1:
        table = score(queries)
        table.save(out)
        return table
    shard_dir = out / ".shards" / f"rank{state.process_index}"
    with state.split_between_processes(queries) as shard:
        if shard:
            score(list(shard)).save(shard_dir)
        logger.info("rank %d scored %d of %d queries", state.process_index, len(shard), len(queries))
    state.wait_for_everyone()
    merged = None
    if state.is_main_process:
        parts = [ScoreTable.load(p) for p in sorted((out / ".shards").iterdir(),
                                                     key=lambda p: int(p.name.removeprefix("rank")))]
        merged = ScoreTable.concat(parts).select([q.id for q in queries])
        merged.meta["processes"] = state.num_processes
        merged.save(out)
        shutil.rmtree(out / ".shards")
    state.wait_for_everyone()
    return merged
