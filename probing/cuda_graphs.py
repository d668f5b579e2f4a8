"""CUDA graphs for the launch-bound parts of a run: a module's kernels recorded once per input
shape and replayed with one launch.

At 7B on an H200 the study's caption decoding and its vision-tower calls are bound by launching
small kernels from Python (and by the GIL the prefetch workers share), not by the kernels; the
scorer's trunk forwards are not (docs/performance.md §2b). `probing.decode` replays a decode step,
`probing.pipeline.image_features` the vision tower and projector through `ShapeGraphs`.

A replay runs the kernels eager mode would launch for the same shapes, reading the weights where
they are: results are those of the eager call (float32 bit for bit on an H200, gpu_study.py
--decode-check). Python in the recorded call runs only at capture, so a module with hooks that run
Python is never graphed (`graph_obstacle`). ``MECHPROBE_CUDA_GRAPHS=0`` turns graphs off.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Iterable

import torch
from torch import nn

log = logging.getLogger(__name__)

#: the environment variable that turns CUDA graphs off when "0"
ENV = "MECHPROBE_CUDA_GRAPHS"


def graphs_allowed() -> bool:
    """False when ``MECHPROBE_CUDA_GRAPHS=0`` (read at each call, so a benchmark can compare)."""
    return os.environ.get(ENV, "1").strip() != "0"


def _runs_python(hook) -> bool:
    """False for transformers' own output-capturing hooks (installed on a first forward): outside
    a forward that asks for hidden states they return at once, and inside one (the vision tower
    for LLaVA's feature layer) they only pick which tensors the caller reads, the same tensors at
    every replay."""
    return getattr(hook, "__module__", None) != "transformers.utils.output_capturing"


def graph_obstacle(modules: nn.Module | Iterable[nn.Module]) -> str | None:
    """Why a call through ``modules`` cannot be replayed from a CUDA graph, or None when it can.

    A graph replays kernels only: a hook's Python would run once, at capture. A compiled module
    would compile during capture. Weights on several devices need more than one stream."""
    if not graphs_allowed():
        return f"{ENV}=0"
    mods = [modules] if isinstance(modules, nn.Module) else list(modules)
    glob = nn.modules.module
    if glob._global_forward_hooks or glob._global_forward_pre_hooks:
        return "global module hooks are registered"
    devices = set()
    for top in mods:
        for name, module in top.named_modules():
            if any(_runs_python(h) for h in (*module._forward_hooks.values(), *module._forward_pre_hooks.values())):
                return f"module {name or type(top).__name__!r} has forward hooks"
            if getattr(module, "_compiled_call_impl", None) is not None:
                return f"module {name or type(top).__name__!r} is compiled"
        devices |= {p.device for p in top.parameters()}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        return f"the weights are on {', '.join(sorted(str(d) for d in devices))}, not on one CUDA device"
    return None


def warm_up(fn: Callable[[], object], device: torch.device) -> object:
    """Run ``fn`` once for real on a side stream, as a capture needs first (lazy initialisation,
    workspaces); the current stream then waits for it."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        out = fn()
    torch.cuda.current_stream(device).wait_stream(side)
    return out


def record(fn: Callable[[], object], pool=None) -> tuple[torch.cuda.CUDAGraph, object]:
    """Record ``fn`` (already warmed up) as a graph, running nothing. Returns the graph and what the
    recorded call returned (its tensors are rewritten by each replay). ``thread_local``: the
    study's worker threads may pin host memory meanwhile, which does not disturb the capture."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out = fn()
    return graph, out


class ShapeGraphs:
    """``fn(x)`` for a CUDA tensor ``x``, replayed from a graph recorded for ``x``'s shape and dtype.

    ``weights_key()`` names the weights the graphs read (e.g. their data pointers): when it
    changes, the graphs are recorded again. At most ``max_graphs`` shapes are kept (all in one
    memory pool: a replay's output is copied out before the next replay, so they never overlap);
    other shapes, and a capture that fails, run eagerly.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], weights_key: Callable[[], object],
                 max_graphs: int = 32, name: str = "graph"):
        self.fn, self.weights_key, self.max_graphs, self.name = fn, weights_key, max_graphs, name
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._failed: set[tuple] = set()
        self._key = None
        self._pool = None
        #: replays and eager calls so far (what a benchmark reports)
        self.replays = 0
        self.eager_calls = 0

    def __len__(self) -> int:
        """Graphs recorded (for the current weights)."""
        return len(self._graphs)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = self.weights_key()
        if key != self._key:  # other weights: recorded pointers would be stale
            self._graphs.clear()
            self._failed.clear()
            self._key, self._pool = key, None
        shape = (tuple(x.shape), x.dtype, x.device)
        entry = self._graphs.get(shape)
        if entry is None and shape not in self._failed and len(self._graphs) < self.max_graphs:
            entry = self._record(shape, x)
        if entry is None:
            self.eager_calls += 1
            return self.fn(x)
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        self.replays += 1
        return static_out.clone()  # the next replay rewrites static_out

    def _record(self, shape: tuple, x: torch.Tensor):
        static_in = torch.empty_like(x)
        static_in.copy_(x)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            warm_up(lambda: self.fn(static_in), x.device)
            graph, static_out = record(lambda: self.fn(static_in), self._pool)
        except Exception as exc:  # noqa: BLE001 - the eager call still works
            log.warning("%s: shape %s runs without a CUDA graph: capturing failed (%s: %s)", self.name,
                        tuple(x.shape), type(exc).__name__, exc)
            self._failed.add(shape)
            return None
        self._graphs[shape] = (graph, static_in, static_out)
        return self._graphs[shape]
