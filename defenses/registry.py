"""Defense names -> factories, and ensemble expressions such as "a+b" and "a|b"."""

from __future__ import annotations

from typing import Callable

from .activation import act_ablate, act_conditional_steer, act_steer
from .base import Defense
from .ensemble import Both, Compose, Either, Mean
from .finetune import mo_checkpoint, mo_finetune
from .noise import ni_image_gaussian, ni_image_mask, ni_text_smooth
from .prompts import sr_adashield_s, sr_custom, sr_mmsafety, sr_self_reminder
from .refactor import qr_caption, qr_caption_no_image, qr_intention, qr_rewrite

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
    "act_ablate": act_ablate,
}
_SCORE_OPS = {"|": Either, "&": Both, "~": Mean}


def register(name: str, factory: Callable[..., Defense]) -> None:
    """Add your own defense under ``name`` (it then also works inside ensemble expressions)."""
    if name in REGISTRY:
        raise ValueError(f"a defense named {name!r} is already registered")
    REGISTRY[name] = factory


def get_defense(name: str, **params) -> Defense:
    """A defense by name, or an ensemble expression: "a+b" (apply both), "a|b" (refuse if either),
    "a&b" (both must refuse), "a~b" (mean p_refuse). ``params`` go to a single defense's factory;
    ensemble members take their defaults. Score-level operators bind looser than "+"."""
    name = name.strip()
    for op, combine in _SCORE_OPS.items():
        if op in name:
            if params:
                raise ValueError(f"parameters cannot be passed to an ensemble expression ({name!r}); "
                                 "build the members with get_defense and combine them")
            return combine(*(get_defense(part) for part in name.split(op)))
    if "+" in name:
        if params:
            raise ValueError(f"parameters cannot be passed to an ensemble expression ({name!r})")
        return Compose(members=[get_defense(part) for part in name.split("+")])
    if name not in REGISTRY:
        raise ValueError(f"unknown defense {name!r}; available: {', '.join(sorted(REGISTRY))}")
    try:
        return REGISTRY[name](**params)
    except TypeError as exc:
        raise ValueError(f"defense {name!r}: {exc}") from None
