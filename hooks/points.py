"""Hook points of a LLaVA language model, named as in TransformerLens.

=========================  ==========================================  ===================
name                       what it is                                  where it is hooked
=========================  ==========================================  ===================
blocks.{i}.hook_resid_pre  residual stream entering decoder layer i    pre-hook, layer i
blocks.{i}.hook_resid_mid  after attention, before the MLP             pre-hook, post_attention_layernorm
blocks.{i}.hook_resid_post residual stream leaving decoder layer i     hook, layer i
blocks.{i}.hook_attn_out   attention output added to the residual      hook, self_attn
blocks.{i}.hook_mlp_out    MLP output added to the residual            hook, mlp
=========================  ==========================================  ===================

Every activation is ``[batch, seq, d_model]``. Layers that return a tensor and layers that return
a tuple (older transformers) are both handled.

Order at one module: hooks that change activations (`edit`) run before hooks that only read them
(`capture`, the scorer's `DecisionCapture`), whichever was registered first, so a capture always
sees every active edit. `attach(..., reads_only=True)` marks a reader; a hook that changes the
activation is registered after the readers and then moved ahead of them (edits among themselves
keep their registration order: an outer block's edit runs before an inner block's).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Collection

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from .errors import HookError

KINDS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")
_NAME = re.compile(r"^blocks\.(\d+)\.(hook_\w+)$")

#: fn(activation [batch, seq, d_model]) -> replacement tensor, or None to leave it unchanged
ActivationFn = Callable[[torch.Tensor], "torch.Tensor | None"]


@dataclass(frozen=True)
class HookPoint:
    name: str
    layer: int
    kind: str


def hook_name(layer: int, kind: str = "hook_resid_post") -> str:
    return f"blocks.{layer}.{kind}"


def parse_hook_name(name: str, n_layers: int) -> HookPoint:
    """Validate a hook-point name; the error lists what exists."""
    m = _NAME.match(name)
    if not m or m.group(2) not in KINDS:
        raise HookError(f"unknown hook point {name!r}; expected blocks.{{i}}.<kind> with kind in {KINDS}")
    layer = int(m.group(1))
    if layer >= n_layers:
        raise HookError(f"hook point {name!r}: layer {layer} out of range (model has {n_layers} layers)")
    return HookPoint(name, layer, m.group(2))


def _find(model, paths, accept):
    """The first object reached along one of the dotted ``paths`` that ``accept`` takes, or None."""
    for path in paths:
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if accept(obj):
            return obj
    return None


def decoder_layers(model) -> nn.ModuleList:
    """The decoder layers of a ModelBundle, a LlavaForConditionalGeneration or a Llama model."""
    found = _find(model, ("layers", "model.language_model.layers", "language_model.layers", "model.layers"),
                  lambda obj: isinstance(obj, nn.ModuleList))
    if found is None:
        raise HookError(f"cannot find decoder layers on {type(model).__name__}")
    return found


def language_model(model) -> nn.Module:
    """The module that receives the 2-D attention mask (``model.model.language_model``); a bare
    decoder stack (a module with ``layers``) is its own language model."""
    found = _find(model, ("language_model", "model.language_model", "model"),
                  lambda obj: isinstance(obj, nn.Module) and hasattr(obj, "layers"))
    if found is None and isinstance(model, nn.Module) and hasattr(model, "layers"):
        found = model
    if found is None:
        raise HookError(f"cannot find the language model on {type(model).__name__}")
    return found


#: ids of the hooks registered now that only read activations (see the module docstring)
_READERS: set[int] = set()


def mark_reader(handle: RemovableHandle) -> RemovableHandle:
    """Mark a registered hook as one that only reads: hooks that change activations at its module
    will run before it. Release it with `release`."""
    _READERS.add(handle.id)
    return handle


def release(handle: RemovableHandle) -> None:
    """Remove a hook registered through this module (and forget that it was a reader)."""
    handle.remove()
    _READERS.discard(handle.id)


#: modules whose hooks only read and are inert here: transformers 5 installs output-capturing hooks
#: on the first forward that asks for ``output_hidden_states`` (the vision tower does, for its
#: feature layer) and never removes them; they record only while such a forward runs
_INERT_HOOK_MODULES = ("transformers.utils.output_capturing",)


def _is_reader(hid: int, fn) -> bool:
    return hid in _READERS or getattr(fn, "__module__", None) in _INERT_HOOK_MODULES


def _readers_last(hooks) -> None:
    """Move the readers among ``hooks`` (a module's ``_forward_hooks`` or ``_forward_pre_hooks``,
    the ordered dicts torch itself reorders for ``prepend=True``) to the end, in their order:
    ours, and transformers' output capturing (so ``output_hidden_states`` sees edits too)."""
    for hid in [h for h, fn in hooks.items() if _is_reader(h, fn)]:
        hooks.move_to_end(hid)


def layer_hooks(model, exclude: Collection[int] = ()) -> list[str]:
    """The forward hooks and pre-hooks on the decoder layers (and their submodules) of ``model``,
    as ``"layers.<i>[.<submodule>] (forward hook | forward pre-hook)"``, leaving out the hook ids in
    ``exclude`` and transformers' own inert output-capturing hooks: the hooks of an active
    `capture` or `edit` block, or a user's raw torch hooks. Empty in a clean state."""
    found = []
    for name, module in decoder_layers(model).named_modules(prefix="layers"):
        for kind, hooks in (("forward hook", module._forward_hooks), ("forward pre-hook", module._forward_pre_hooks)):
            for hid, fn in hooks.items():
                if hid in exclude or getattr(fn, "__module__", None) in _INERT_HOOK_MODULES:
                    continue
                found.append(f"{name} ({kind})")
    return found


def _replace_first(output, new):
    if isinstance(output, tuple):
        return (new, *output[1:])
    return new


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def attach(layers: nn.ModuleList, point: HookPoint, fn: ActivationFn, *, reads_only: bool = False) -> RemovableHandle:
    """Register ``fn`` at ``point``; the caller owns the returned handle and removes it with
    `release`. ``reads_only``: ``fn`` never changes the activation (a capture); hooks that may
    change it run before every reader at the module (see the module docstring)."""
    layer = layers[point.layer]
    if point.kind in ("hook_resid_pre", "hook_resid_mid"):
        module = layer if point.kind == "hook_resid_pre" else layer.post_attention_layernorm

        def pre_hook(_module, args, kwargs):
            if args:
                new = fn(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            new = fn(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})

        handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        return _placed(handle, module._forward_pre_hooks, reads_only)

    module = {
        "hook_resid_post": layer,
        "hook_attn_out": getattr(layer, "self_attn", None),
        "hook_mlp_out": getattr(layer, "mlp", None),
    }[point.kind]
    if module is None:
        raise HookError(f"hook point {point.name!r}: layer {point.layer} has no such submodule")

    def hook(_module, _args, output):
        new = fn(_first(output))
        return None if new is None else _replace_first(output, new)

    return _placed(module.register_forward_hook(hook), module._forward_hooks, reads_only)


def _placed(handle: RemovableHandle, hooks, reads_only: bool) -> RemovableHandle:
    if reads_only:
        return mark_reader(handle)
    _readers_last(hooks)
    return handle
