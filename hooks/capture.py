"""Context managers that read (`capture`) or change (`edit`) activations during a forward pass.

Both remove every hook they registered when the block ends, normally or by an exception.
Positions are resolved per forward from the attention mask the language model receives, so left
padding is accounted for without the caller passing the mask.

    with capture(bundle, ["blocks.3.hook_resid_post"]) as cache:
        bundle.model(**inputs)
    cache["blocks.3.hook_resid_post"]        # [batch, d_model] at the decision position
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch

from .points import HookPoint, attach, decoder_layers, language_model, parse_hook_name
from .positions import as_positions, gather, scatter
from .errors import HookError, NotCapturedError


class _MaskTracker:
    """Remembers the 2-D attention mask of the current forward (None when there is none)."""

    def __init__(self):
        self.mask: torch.Tensor | None = None

    def hook(self, _module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


@contextlib.contextmanager
def _registered(model, points: Iterable[HookPoint], make_fn) -> Iterator[_MaskTracker]:
    layers = decoder_layers(model)
    tracker = _MaskTracker()
    handles = []
    try:
        handles.append(language_model(model).register_forward_pre_hook(tracker.hook, with_kwargs=True))
        for point in points:
            handles.append(attach(layers, point, make_fn(point, tracker)))
        yield tracker
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class ActivationCache:
    """Captured activations by hook name, one tensor per forward call in order.

    ``cache[name]`` concatenates the calls along the batch dimension.
    """

    calls: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.calls or not self.calls[name]:
            raise NotCapturedError(f"nothing captured at {name!r}; captured: {sorted(self.calls)}")
        chunks = self.calls[name]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks, 0)

    def __contains__(self, name: str) -> bool:
        return bool(self.calls.get(name))

    def keys(self):
        return self.calls.keys()

    def clear(self) -> None:
        for chunks in self.calls.values():
            chunks.clear()


@contextlib.contextmanager
def capture(
    model,
    names: Iterable[str],
    positions="decision",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Iterator[ActivationCache]:
    """Capture detached activations at hook points and positions.

    Args:
        model: a ModelBundle or a LLaVA / Llama HF model.
        names: hook-point names such as ``blocks.3.hook_resid_post``.
        positions: "decision" (``[batch, d_model]``), an int k (last k real tokens,
            ``[batch, k, d_model]``), per-row index lists, or "all" (``[batch, seq, d_model]``).
        device, dtype: where / how to store captures (default: as produced). Layers on
            several devices are gathered onto ``device``.
    """
    layers = decoder_layers(model)
    points = [parse_hook_name(n, len(layers)) for n in names]
    pos = as_positions(positions)
    cache = ActivationCache({p.name: [] for p in points})

    def make_fn(point: HookPoint, tracker: _MaskTracker):
        def fn(act: torch.Tensor):
            idx = pos.index(tracker.mask, act.shape[0], act.shape[1], act.device)
            got = gather(act, idx)
            if pos.squeeze:
                got = got[:, 0]
            # Index selection already made a new tensor; only the live activation ("all") needs a copy.
            got = got.detach().to(device=device, dtype=dtype, copy=idx is None)
            cache.calls[point.name].append(got)
            return None

        return fn

    with _registered(model, points, make_fn):
        yield cache


@dataclass(frozen=True)
class EditContext:
    """What an edit function knows about where it runs.

    Attributes:
        name, layer, kind: the hook point.
        index: absolute positions edited, ``[batch, k]`` (None: all positions).
        attention_mask: the language model's 2-D mask for this forward (None if not given).
    """

    name: str
    layer: int
    kind: str
    index: torch.Tensor | None
    attention_mask: torch.Tensor | None


#: fn(activation at the selected positions, context) -> replacement of the same shape
EditFn = Callable[[torch.Tensor, EditContext], torch.Tensor]


@contextlib.contextmanager
def edit(model, edits: dict[str, EditFn], positions="all") -> Iterator[None]:
    """Replace activations during forwards inside the block.

    Each function gets the activation at the selected positions (``[batch, d_model]`` for
    "decision", ``[batch, k, d_model]`` for k or index lists, ``[batch, seq, d_model]`` for "all")
    and returns a tensor of the same shape. Hooks are removed when the block ends.
    """
    layers = decoder_layers(model)
    points = {parse_hook_name(n, len(layers)): fn for n, fn in edits.items()}
    pos = as_positions(positions)

    def make_fn(point: HookPoint, tracker: _MaskTracker):
        user_fn = points[point]

        def fn(act: torch.Tensor):
            idx = pos.index(tracker.mask, act.shape[0], act.shape[1], act.device)
            sel = gather(act, idx)
            if pos.squeeze:
                sel = sel[:, 0]
            ctx = EditContext(point.name, point.layer, point.kind, idx, tracker.mask)
            new = user_fn(sel, ctx)
            if not isinstance(new, torch.Tensor) or new.shape != sel.shape:
                raise HookError(
                    f"edit at {point.name}: function must return a tensor of shape {tuple(sel.shape)}, "
                    f"got {getattr(new, 'shape', type(new).__name__)}"
                )
            if pos.squeeze:
                new = new.unsqueeze(1)
            return scatter(act, idx, new.to(act.dtype))

        return fn

    with _registered(model, points, make_fn):
        yield
