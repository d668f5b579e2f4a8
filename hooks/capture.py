"""Context managers that read (`capture`) or change (`edit`) activations during a forward pass.

Both remove every hook they registered when the block ends, normally or by an exception.
Positions are resolved per forward from the attention mask the language model receives, so left
padding is accounted for without the caller passing the mask.

    with capture(bundle, ["blocks.3.hook_resid_post"]) as cache:
        bundle.model(**inputs)
    cache["blocks.3.hook_resid_post"]        # [batch, d_model] at the decision position

Order at one hook point: every `edit` runs before every `capture`, whichever block was entered
first, so a capture sees the activation after all active edits (as the scorer's own hidden states
do); edits at one point run in the order their blocks were entered (the outer block's first). A
raw torch hook registered before an edit block sees the activation before that edit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch

from .points import HookPoint, attach, decoder_layers, language_model, mark_reader, parse_hook_name, release
from .positions import DECISION, as_positions, gather, scatter
from .errors import HookError, NotCapturedError


class _MaskTracker:
    """Remembers the 2-D attention mask of the current forward (None when there is none).

    Position indices depend only on the mask and the activation's shape, so they are computed
    once per forward and shared by every hook point (they are reset when the next forward of the
    language model starts).
    """

    def __init__(self):
        self.mask: torch.Tensor | None = None
        self._index: dict = {}

    def hook(self, _module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.dtype == torch.bool:
            # a ready boolean causal mask ([batch, 1, queries, keys], as the scorer passes for
            # padded batches): its last query sees every key that is real, so that row is the
            # 2-D padding mask
            mask = mask[:, 0, -1]
        self.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self._index = {}

    def index(self, pos, batch: int, seq: int, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``pos``'s indices ``[batch, k]`` for this forward, and the same as flat row indices into
        ``[batch * seq, ...]`` (None for every position)."""
        key = (batch, seq, device)
        got = self._index.get(key)
        if got is None:
            idx = pos.index(self.mask, batch, seq, device)
            flat = None
            if idx is not None:
                flat = (idx + torch.arange(0, batch * seq, seq, device=device).unsqueeze(-1)).reshape(-1)
            got = self._index[key] = (idx, flat)
        return got


def _take(act: torch.Tensor, idx: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """``gather(act, idx)``: the same values, by one ``index_select`` on the flattened rows."""
    if not act.is_contiguous():
        return gather(act, idx)
    batch, seq = act.shape[:2]
    rest = act.shape[2:]
    return act.reshape(batch * seq, *rest).index_select(0, flat).view(batch, idx.shape[1], *rest)


@contextlib.contextmanager
def _registered(model, points: Iterable[HookPoint], make_fn, reads_only: bool) -> Iterator[_MaskTracker]:
    layers = decoder_layers(model)
    tracker = _MaskTracker()
    points = list(points)
    handles = []
    try:
        if points:  # no hook at all for nothing to capture or edit (`run_plan`'s plans without edits)
            handles.append(language_model(model).register_forward_pre_hook(tracker.hook, with_kwargs=True))
        for point in points:
            handles.append(attach(layers, point, make_fn(point, tracker), reads_only=reads_only))
        yield tracker
    finally:
        for handle in handles:
            release(handle)


def _names(names, what: str) -> list[str]:
    """Hook-point names as a list: one name alone is taken as one name, not as its characters."""
    if isinstance(names, str):
        return [names]
    try:
        names = list(names)
    except TypeError:
        raise HookError(f"{what}: hook names must be a name or a list of names such as "
                        f"'blocks.3.hook_resid_post', got {type(names).__name__}") from None
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise HookError(f"{what}: hook names must be strings such as 'blocks.3.hook_resid_post', got {bad[0]!r}")
    return names


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
        if len(chunks) == 1:
            return chunks[0]
        shapes = {tuple(c.shape[1:]) for c in chunks}
        if len(shapes) > 1:
            lengths = [c.shape[1] if c.dim() > 1 else None for c in chunks]
            raise HookError(f"{name!r}: the {len(chunks)} captured forwards have different shapes (sequence "
                            f"lengths {lengths[:8]}{'...' if len(chunks) > 8 else ''}), so they cannot be joined "
                            f"into one tensor: read them one forward at a time from cache.calls[{name!r}], or "
                            f"capture positions='decision' or a last k")
        return torch.cat(chunks, 0)

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
        names: hook-point names such as ``blocks.3.hook_resid_post`` (or one name).
        positions: "decision" (``[batch, d_model]``), an int k (last k real tokens,
            ``[batch, k, d_model]``), per-row index lists, or "all" (``[batch, seq, d_model]``).
        device, dtype: where / how to store captures (default: as produced). Layers on
            several devices are gathered onto ``device``.

    Every forward of the language model inside the block is recorded, in the order the forwards
    run; ``cache[name]`` joins them along the batch dimension. Around `RefusalScorer.score` that
    is the scorer's batch order (batches sorted by prompt length), not the table's row order:
    ``scorer.plan_score(queries, prompt).in_table_order(cache[name])`` puts the rows of a plain
    ``score`` call in table order (a defense's variants and parts add rows of their own). With
    "all" or index lists, forwards of different lengths cannot be joined: read
    ``cache.calls[name]`` one forward at a time. The activation is read after every active `edit`
    at the same hook point (see the module docstring).
    """
    layers = decoder_layers(model)
    points = [parse_hook_name(n, len(layers)) for n in _names(names, "capture")]
    pos = as_positions(positions)
    cache = ActivationCache({p.name: [] for p in points})

    def make_fn(point: HookPoint, tracker: _MaskTracker):
        chunks = cache.calls[point.name]
        convert = device is not None or dtype is not None

        def fn(act: torch.Tensor):
            idx, flat = tracker.index(pos, act.shape[0], act.shape[1], act.device)
            if idx is None:  # the live activation ("all") needs a copy
                got = act.detach().to(device=device, dtype=dtype, copy=True)
            else:  # index selection already made a new tensor
                got = _take(act, idx, flat).detach()
                if pos.squeeze:
                    got = got[:, 0]
                if convert:
                    got = got.to(device=device, dtype=dtype)
            chunks.append(got)
            return None

        return fn

    with _registered(model, points, make_fn, reads_only=True):
        yield cache


class DecisionCapture:
    """``capture(model, resid_post of layers, "decision")`` prepared once for many forwards.

    The scorer's hot path: modules and hook functions are resolved when it is built, so entering
    the block only registers one pre-hook on the language model and one forward hook per layer
    (all removed when the block ends, also on an exception). The decision index is computed once
    per forward from the language model's own attention mask and shared by every layer; each
    layer then costs one ``index_select``. Values are those of `capture` (tested).

        reader = DecisionCapture(bundle, [0, 1, 2, 3])
        with reader:
            out = bundle.model.model(**inputs)
        reader.hidden()                  # [batch, L, d_model], layers in the order given
        reader.select(out.last_hidden_state)   # [batch, d_model] at the same positions
    """

    def __init__(self, model, layers: Iterable[int], device: str | torch.device | None = None):
        #: True while every forward's batch is known to be left-padded (each row's last position is
        #: real): the decision position is then the last one, read as a view without the mask
        #: arithmetic and gathers (the same values). Set by the caller that built the batch.
        self.left_padded = False
        modules = decoder_layers(model)
        self.layers = [parse_hook_name(f"blocks.{int(i)}.hook_resid_post", len(modules)).layer for i in layers]
        self._lm = language_model(model)
        self._modules = [modules[i] for i in self.layers]
        #: where captures are stored (None: where they are produced); may be changed between blocks
        self.device = None if device is None else torch.device(device)
        self._handles: list = []
        self._depth = 0
        self._tracker = _MaskTracker()  # the forward's mask and its decision index, shared by all layers
        self._got: list[torch.Tensor | None] = [None] * len(self.layers)
        self._hooks = [self._make_hook(k) for k in range(len(self.layers))]

    def _pre(self, module, args, kwargs):
        self._tracker.hook(module, args, kwargs)
        self._got[:] = [None] * len(self.layers)

    def select(self, act: torch.Tensor) -> torch.Tensor:
        """``act [batch, seq, ...]`` at this forward's decision positions: ``[batch, ...]`` (a view
        of ``act`` when ``left_padded``)."""
        if self.left_padded:
            return act[:, -1]
        idx, flat = self._tracker.index(DECISION, act.shape[0], act.shape[1], act.device)
        return _take(act, idx, flat)[:, 0]

    def _make_hook(self, k: int):
        got = self._got

        def hook(_module, _args, output):
            act = output[0] if isinstance(output, tuple) else output
            out = self.select(act.detach() if act.requires_grad else act)
            if self.left_padded:
                # `select` gave a view; a copy lets the layer's whole [batch, seq, d] output be
                # freed before the forward ends (gigabytes at 7B)
                out = out.clone()
            if self.device is not None and out.device != self.device:
                out = out.to(self.device)
            got[k] = out
            return None

        return hook

    def hidden(self) -> torch.Tensor:
        """The captured layers stacked: ``[batch, L, d_model]``."""
        if any(g is None for g in self._got):
            missing = [i for i, g in zip(self.layers, self._got) if g is None]
            raise NotCapturedError(f"nothing captured at layers {missing}: no forward ran inside the block")
        return torch.stack(self._got, 1)

    def __enter__(self) -> "DecisionCapture":
        """Register the hooks (nested blocks reuse the outer block's hooks)."""
        if self._depth == 0:
            try:
                self._handles.append(self._lm.register_forward_pre_hook(self._pre, with_kwargs=True))
                for module, hook in zip(self._modules, self._hooks):
                    # a reader: edits at the same layer (a defense's, entered inside) run first
                    self._handles.append(mark_reader(module.register_forward_hook(hook)))
            except BaseException:
                self._remove()
                raise
        self._depth += 1
        self._got[:] = [None] * len(self.layers)  # the hooks hold this list
        self._tracker = _MaskTracker()  # no index of an earlier forward survives
        return self

    def _remove(self) -> None:
        for handle in self._handles:
            release(handle)
        self._handles = []

    @property
    def hook_ids(self) -> set[int]:
        """The ids of the hooks registered now (none outside the block)."""
        return {handle.id for handle in self._handles}

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._remove()

    @property
    def active(self) -> bool:
        """Whether the hooks are registered now."""
        return bool(self._handles)


@dataclass(frozen=True)
class EditContext:
    """What an edit function knows about where it runs.

    Attributes:
        name, layer, kind: the hook point.
        index: absolute positions edited, ``[batch, k]`` (None: all positions).
        attention_mask: the language model's 2-D mask for this forward (None if not given; boolean,
            read from its last row, when the forward was given a ready 4-D causal mask).
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

    ``edits`` maps hook names to functions. At one hook point, edits run before every `capture`
    (also one entered earlier) and in the order their blocks were entered (see the module
    docstring). The scorer's prefix-shared paths (`probing.sweep.score_conditions`, a defense's
    text variants) score independent passes while an edit or capture is active on the layers:
    a positional edit would otherwise also edit the shared prefix's own last tokens.
    """
    layers = decoder_layers(model)
    if not isinstance(edits, Mapping):
        raise HookError(f"edit: edits must be a dict {{hook name: fn(act, ctx)}}, got {type(edits).__name__}")
    bad = [fn for fn in edits.values() if not callable(fn)]
    if bad:
        raise HookError(f"edit: each edit must be a function fn(act, ctx) -> act, got {type(bad[0]).__name__}")
    points = {parse_hook_name(n, len(layers)): fn for n, fn in edits.items()}
    pos = as_positions(positions)

    def make_fn(point: HookPoint, tracker: _MaskTracker):
        user_fn = points[point]

        def fn(act: torch.Tensor):
            idx, flat = tracker.index(pos, act.shape[0], act.shape[1], act.device)
            sel = act if idx is None else _take(act, idx, flat)
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

    with _registered(model, points, make_fn, reads_only=False):
        yield
