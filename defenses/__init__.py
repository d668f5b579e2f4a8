"""Jailbreak defenses as objects the scorer applies: SR, QR, NI, MO, activation-level, ensembles.

    from defenses import get_defense
    table = scorer.score(queries, defense=get_defense("sr_self_reminder"))
    table = scorer.score(queries, defense="qr_caption|sr_self_reminder")
"""

from probing.analysis.directions import refusal_directions
from probing.plan import set_defense_resolver

from .activation import act_ablate, act_conditional_steer, act_steer
from .base import CATEGORIES, Defense, check_finite, check_int, check_layers, check_rate
from .composite import Both, Compose, Either, Mean
from .finetune import mo_checkpoint, mo_finetune
from .noise import ni_image_gaussian, ni_image_mask, ni_text_smooth
from .prompts import PromptDefense, sr_adashield_s, sr_custom, sr_mmsafety, sr_self_reminder
from .registry import REGISTRY, check_names, get_defense, register
from .rewriting import qr_caption, qr_caption_no_image, qr_intention, qr_rewrite

# Lets `RefusalScorer.score(queries, defense="name")` resolve names without importing this package.
set_defense_resolver(get_defense)

__all__ = [
    "CATEGORIES", "Defense", "check_finite", "check_int", "check_layers", "check_rate", "PromptDefense", "Compose", "Either", "Both", "Mean", "REGISTRY", "check_names", "get_defense",
    "register", "refusal_directions", "act_ablate", "act_conditional_steer", "act_steer", "mo_checkpoint",
    "mo_finetune", "ni_image_gaussian", "ni_image_mask", "ni_text_smooth", "sr_adashield_s", "sr_custom",
    "sr_mmsafety", "sr_self_reminder", "qr_caption", "qr_caption_no_image", "qr_intention", "qr_rewrite",
]
