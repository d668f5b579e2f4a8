"""Jailbreak defenses as objects the scorer applies: SR, QR, NI, MO, activation-level, ensembles.

    from defenses import get_defense
    table = scorer.score(queries, defense=get_defense("sr_self_reminder"))
    table = scorer.score(queries, defense="qr_caption|sr_self_reminder")
"""

from .activation import act_ablate, act_conditional_steer, act_steer, refusal_directions
from .base import CATEGORIES, Defense
from .ensemble import Both, Compose, Either, Mean
from .finetune import mo_checkpoint, mo_finetune
from .noise import ni_image_gaussian, ni_image_mask, ni_text_smooth
from .prompts import PromptDefense, sr_adashield_s, sr_custom, sr_mmsafety, sr_self_reminder
from .refactor import qr_caption, qr_caption_no_image, qr_intention, qr_rewrite
from .registry import REGISTRY, get_defense, register

__all__ = [
    "CATEGORIES", "Defense", "PromptDefense", "Compose", "Either", "Both", "Mean", "REGISTRY", "get_defense",
    "register", "refusal_directions", "act_ablate", "act_conditional_steer", "act_steer", "mo_checkpoint",
    "mo_finetune", "ni_image_gaussian", "ni_image_mask", "ni_text_smooth", "sr_adashield_s", "sr_custom",
    "sr_mmsafety", "sr_self_reminder", "qr_caption", "qr_caption_no_image", "qr_intention", "qr_rewrite",
]
