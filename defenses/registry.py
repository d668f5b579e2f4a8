"""Defense names -> factories, and ensemble expressions such as "a+b" and "a|b".

    get_defense("sr_self_reminder")
    get_defense("qr_caption_no_image|sr_self_reminder")
    get_defense("act_steer", baseline=table)          # activation defenses read a baseline run

Activation-level factories take the baseline ScoreTable (scored with ``keep_hidden=True``) as
their first argument; `get_defense` passes ``baseline`` to every factory that needs one, inside
ensemble expressions too, and names the missing baseline otherwise.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import logging
from typing import Callable

from probing.errors import InputError

from .activation import act_ablate, act_conditional_steer, act_steer
from .base import Defense
from .composite import Both, Compose, Either, Mean
from .finetune import mo_checkpoint, mo_finetune
from .noise import ni_image_gaussian, ni_image_mask, ni_text_smooth
from .prompts import sr_adashield_s, sr_custom, sr_mmsafety, sr_self_reminder
from .rewriting import qr_caption, qr_caption_no_image, qr_intention, qr_rewrite

REGISTRY: dict[str, Callable[..., Defense]] = {
    "sr_self_reminder": sr_self_reminder,
    "sr_adashield_s": sr_adashield_s,
    "sr_mmsafety": sr_mmsafety,
    "sr_custom": sr_custom,
    "qr_caption": qr_caption,
    "qr_caption_no_image": qr_caption_no_image,
    "qr_intention": qr_intention,
    "qr_rewrite": qr_rewrite,
    "ni_image_gaussian": ni_image_gaussian,
    "ni_image_mask": ni_image_mask,
    "ni_text_smooth": ni_text_smooth,
    "mo_finetune": mo_finetune,
    "mo_checkpoint": mo_checkpoint,
    "act_steer": act_steer,
    "act_conditional_steer": act_conditional_steer,
    # ablating the first and last layers mostly breaks the model; the registry's default is the inner ones
    "act_ablate": functools.partial(act_ablate, layers="inner"),
}
logger = logging.getLogger(__name__)

_SCORE_OPS = {"|": Either, "&": Both, "~": Mean}
_BASELINE_ARGS = ("table", "baseline")


def register(name: str, factory: Callable[..., Defense]) -> None:
    """Add your own defense under ``name`` (it then also works inside ensemble expressions).

    Registering a re-run of the same definition (the same qualified name and module: a notebook
    cell run again, edited or not) replaces the factory; another factory under a taken name is
    refused."""
    if not name or any(op in name for op in "+|&~,") or name != name.strip():
        raise InputError(f"defense name {name!r}: use a non-empty name without '+', '|', '&', '~', ',' or spaces")
    old = REGISTRY.get(name)
    if old is not None and old is not factory:
        if not _same_definition(old, factory):
            raise InputError(f"a defense named {name!r} is already registered (with another factory)")
        logger.info("defense %r: replacing its factory with the new definition of %s", name, factory.__qualname__)
    REGISTRY[name] = factory


def _same_definition(a, b) -> bool:
    # A re-run cell defines a new function object under the same name; its code, constants or
    # defaults may have been edited, and the new one is what the user means.
    qual_a, qual_b = getattr(a, "__qualname__", None), getattr(b, "__qualname__", None)
    return qual_a is not None and qual_a == qual_b and getattr(a, "__module__", None) == getattr(b, "__module__", None)


def needs_baseline(factory: Callable) -> bool:
    """True for factories whose first parameter is the baseline run (activation defenses)."""
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):
        return False
    return bool(params) and params[0].name in _BASELINE_ARGS and params[0].default is inspect.Parameter.empty


def unknown_name_message(name: str) -> str:
    close = difflib.get_close_matches(name, list(REGISTRY), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown defense {name!r}{hint} (available: {', '.join(sorted(REGISTRY))})"


def split_expression(name: str) -> list[str]:
    """The single defense names an expression mentions, in order ("a+b|c" -> [a, b, c])."""
    parts = [name]
    for op in (*_SCORE_OPS, "+"):
        parts = [p for part in parts for p in part.split(op)]
    return [p.strip() for p in parts]


def split_top(expression: str) -> tuple[str | None, list[str]]:
    """The outermost operator of an ensemble expression and its parts, ``(None, [expression])``
    for a single defense: `get_defense`'s own parse (score-level operators, in `_SCORE_OPS` order,
    bind looser than "+")."""
    for op in (*_SCORE_OPS, "+"):
        if op in expression:
            return op, [p.strip() for p in expression.split(op)]
    return None, [expression]


def check_syntax(expression: str) -> None:
    """Raise `InputError` naming the whole expression when an operator lacks a defense on one
    side ("a||b", "a+", "|b"): the empty name between them is no defense to look up."""
    parts = split_expression(expression.strip())
    if len(parts) > 1 and not all(parts):
        raise InputError(f"ensemble expression {expression!r}: every operator needs a defense name on each side "
                         "(e.g. 'a+b', 'a|b', 'a+b|c')")


def check_names(expression: str) -> None:
    """Raise `InputError` with a "did you mean" for any unknown name in ``expression`` (no compute);
    the message names the whole expression when the name is one part of an ensemble."""
    check_syntax(expression)
    parts = split_expression(expression.strip())
    for part in parts:
        if part not in REGISTRY:
            within = f" in ensemble expression {expression.strip()!r}" if len(parts) > 1 else ""
            raise InputError(unknown_name_message(part) + within)


def get_defense(name: str, *, baseline=None, member: Callable[[str], Defense] | None = None,
                **params) -> Defense:
    """A defense by name, or an ensemble expression: "a+b" (apply both), "a|b" (refuse if either),
    "a&b" (both must refuse), "a~b" (mean p_refuse). ``params`` go to a single defense's factory;
    ensemble members take their defaults. Score-level operators bind looser than "+".
    ``baseline``: the baseline ScoreTable (``keep_hidden=True``) for activation defenses.
    ``member``: builds each single defense of an expression instead (a caller that keeps one
    instance per name, so an ensemble shares its members' trained model or cached generations)."""
    if not isinstance(name, str):
        raise InputError(f"a defense name must be a string, got {type(name).__name__}")
    name = name.strip()
    check_syntax(name)
    op, parts = split_top(name)
    if op in _SCORE_OPS:
        if params:
            raise InputError(f"parameters cannot be passed to an ensemble expression ({name!r}); "
                             "build the members with get_defense and combine them")
        return _SCORE_OPS[op](*(get_defense(part, baseline=baseline, member=member) for part in parts))
    if op == "+":
        if params:
            raise InputError(f"parameters cannot be passed to an ensemble expression ({name!r})")
        return Compose(members=[get_defense(part, baseline=baseline, member=member) for part in parts])
    if member is not None and not params:
        return member(name)
    if name not in REGISTRY:
        raise InputError(unknown_name_message(name))
    factory = REGISTRY[name]
    args = ()
    first = next(iter(inspect.signature(factory).parameters), None) if needs_baseline(factory) else None
    if first is not None and first in params:  # the baseline passed by its parameter name (table=...)
        baseline = params.pop(first) if baseline is None else baseline
    if needs_baseline(factory):
        if baseline is None:
            raise InputError(f"defense {name!r} is built from a baseline run: "
                             f"get_defense({name!r}, baseline=<ScoreTable scored with keep_hidden=True>)")
        args = (baseline,)
    try:
        return factory(*args, **params)
    except TypeError as exc:
        raise InputError(f"defense {name!r}: {exc}") from None
