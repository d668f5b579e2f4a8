"""Model Optimization (MO) defenses: a safety-tuned model replaces the original.

``mo_finetune`` tunes the language model (and projector) with a plain PyTorch loop, VLGuard
style: harmful requests in every delivery (text, typography, picture) get refusal targets,
benign requests helpful answers, mixed with ordinary data (captions) so the model keeps its
skills. Training data comes from the synthetic toy generator (never from MOSSBench or
MM-SafetyBench). ``lora=True`` tunes LoRA adapters through peft instead; ``lora="auto"`` (the
default) does so when the language model has more than 1e9 parameters (LLaVA-1.5-7B: 6.7e9),
counted from the config on the meta device, and tunes fully otherwise (the toy: 1.4e6). A LoRA
copy shares the original's frozen weights instead of copying them (docs/performance.md gives
the memory at 7B). ``mo_checkpoint(path)`` uses an already safety-tuned checkpoint.
"""

from __future__ import annotations

import copy
import logging
import random
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from probing.datasets import toy as data
from probing.errors import InputError
from probing.training import encode_example, fit, sampled_batches

from .base import Defense, check_finite

logger = logging.getLogger(__name__)

#: ``lora="auto"`` tunes LoRA adapters above this many language-model parameters
LORA_AUTO_PARAMETERS = 1e9


def language_model_parameters(config) -> int:
    """Parameters of the language model a (LLaVA) config describes, counted on the meta device:
    nothing is allocated, so a 7B config costs no memory."""
    from transformers import AutoModelForCausalLM

    text = getattr(config, "text_config", config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(text)
    return sum(p.numel() for p in model.parameters())


def use_lora(lora, config) -> bool:
    """Whether ``mo_finetune(lora=...)`` tunes LoRA adapters for a model of this config."""
    if lora == "auto":
        return language_model_parameters(config) > LORA_AUTO_PARAMETERS
    if isinstance(lora, bool):
        return lora
    raise InputError(f"parameter 'lora' must be True, False or 'auto', got {lora!r}")


def safety_examples(seed: int = 0, repeats: int = 2, caption_share: float = 0.3) -> list[data.Example]:
    """Refuse every harmful request, help with every benign one; plus captions as ordinary data."""
    rng = random.Random(f"mo-{seed}")
    out = []
    for q in data.requests("train", seed + 1000, repeats=repeats):
        system = rng.choice(data.PLAIN_SYSTEM + data.SAFETY_SYSTEM)
        refuse = q.label == "harmful"
        target = rng.choice(data.REFUSALS) if refuse else rng.choice(data.COMPLIANCE).format(p=q.meta["phrase"])
        out.append(data.Example(q, system, target))
    caps = data.captions("train", seed + 1000, repeats=repeats)
    out += rng.sample(caps, min(len(caps), int(len(out) * caption_share)))
    rng.shuffle(out)
    return out


@dataclass
class FineTune(Defense):
    name: str = "mo_finetune"
    category: str = "MO"
    steps: int = 120
    lr: float = 1e-3
    batch_size: int = 16
    seed: int = 0
    lora: bool | str = "auto"
    # Keyed by the model object itself, weakly: an entry dies with its model, so a new model that
    # happens to reuse a freed object's id can never be handed another model's fine-tune.
    _cache: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary, repr=False)

    used_lora: bool | None = field(default=None, repr=False)

    def describe(self) -> dict:
        out = super().describe()
        if self.used_lora is not None:  # what "auto" chose for the last model tuned
            out["lora_used"] = self.used_lora
        return out

    def model(self, bundle):
        if bundle.model not in self._cache:
            self._cache[bundle.model] = self._tune(bundle)
        return self._cache[bundle.model]

    def _tune(self, bundle):
        from probing.model import ModelBundle

        # A local generator: a defense never reseeds the global torch RNG (LoRA init draws from it,
        # so it runs under a forked RNG state).
        lora = use_lora(self.lora, bundle.model.config)
        logger.info("mo_finetune: %s", "LoRA adapters" if lora else "full fine-tuning (vision tower frozen)")
        self.used_lora = lora
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            if lora:
                # Every original weight stays frozen: the copy's parameters are new, frozen
                # Parameter objects on the original's storage (tied weights stay tied; the
                # original's own flags are untouched), so the tuned copy costs the adapters, not a
                # second copy of the model.
                memo = {id(p): torch.nn.Parameter(p.detach(), requires_grad=False)
                        for p in bundle.model.parameters()}
                memo.update({id(b): b for b in bundle.model.buffers()})
                model = copy.deepcopy(bundle.model, memo)
            else:
                model = copy.deepcopy(bundle.model)
            if lora:
                try:
                    from peft import LoraConfig, get_peft_model
                except ImportError as exc:
                    raise InputError("mo_finetune with LoRA needs peft: pip install -e \".[lora]\"") from exc
                for p in model.parameters():  # only the adapters train
                    p.requires_grad_(False)
                model.model.language_model = get_peft_model(
                    model.model.language_model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
            else:
                for p in model.model.vision_tower.parameters():
                    p.requires_grad_(False)
            params = [p for p in model.parameters() if p.requires_grad]
            encoded = [encode_example(bundle.processor, e) for e in safety_examples(self.seed)]
            fit(model, params, encoded, steps=self.steps, lr=self.lr, warmup=max(1, self.steps // 10),
                batches=sampled_batches(len(encoded), self.batch_size, random.Random(f"mo-order-{self.seed}")),
                pad_id=bundle.processor.tokenizer.pad_token_id,
                optimizer=torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0),
                device=bundle.input_device, log_every=20, name="mo_finetune")
        for p in model.parameters():
            p.requires_grad_(False)
        return ModelBundle(model, bundle.processor, f"{bundle.name}+mo_finetune", bundle.source_dir)


@dataclass
class Checkpoint(Defense):
    name: str = "mo_checkpoint"
    category: str = "MO"
    path: str = ""
    _cache: dict = field(default_factory=dict, repr=False)

    def model(self, bundle):
        if "bundle" not in self._cache:
            from probing.model import load_model

            self._cache["bundle"] = load_model(self.path, device=bundle.input_device, dtype=bundle.dtype)
        return self._cache["bundle"]


def mo_finetune(steps: int = 120, lr: float = 1e-3, batch_size: int = 16, seed: int = 0,
                lora: bool | str = "auto") -> FineTune:
    """Safety fine-tuning; ``lora``: True, False, or "auto" (LoRA above 1e9 language-model parameters)."""
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"parameter 'steps' must be an integer >= 1, got {steps!r}")
    if lora != "auto" and not isinstance(lora, bool):
        raise InputError(f"parameter 'lora' must be True, False or 'auto', got {lora!r}")
    lr = check_finite("lr", lr)
    if lr <= 0:
        raise InputError(f"parameter 'lr' must be > 0, got {lr}")
    return FineTune(params={"steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed, "lora": lora},
                    steps=steps, lr=lr, batch_size=batch_size, seed=seed, lora=lora)


def mo_checkpoint(path: str | None = None) -> Checkpoint:
    if not path or not Path(path).exists():
        raise InputError(f"parameter 'path': checkpoint not found: {path!r}")
    return Checkpoint(params={"path": str(path)}, path=str(path))


