"""Model Optimization (MO) defenses: a safety-tuned model replaces the original.

``mo_finetune`` tunes the language model (and projector) with a plain PyTorch loop, VLGuard
style: harmful requests in every delivery (text, typography, picture) get refusal targets,
benign requests helpful answers, mixed with ordinary data (captions) so the model keeps its
skills. Training data comes from the synthetic toy generator (never from MOSSBench or
MM-SafetyBench). ``lora=True`` tunes LoRA adapters through peft instead (7B-scale models).
``mo_checkpoint(path)`` uses an already safety-tuned checkpoint.
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
    lora: bool = False
    # Keyed by the model object itself, weakly: an entry dies with its model, so a new model that
    # happens to reuse a freed object's id can never be handed another model's fine-tune.
    _cache: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary, repr=False)

    def model(self, bundle):
        if bundle.model not in self._cache:
            self._cache[bundle.model] = self._tune(bundle)
        return self._cache[bundle.model]

    def _tune(self, bundle):
        from probing.model import ModelBundle

        # A local generator: a defense never reseeds the global torch RNG (LoRA init draws from it,
        # so it runs under a forked RNG state).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = copy.deepcopy(bundle.model)
            if self.lora:
                try:
                    from peft import LoraConfig, get_peft_model
                except ImportError as exc:
                    raise InputError("mo_finetune(lora=True) needs peft: pip install peft") from exc
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


def mo_finetune(steps: int = 120, lr: float = 1e-3, batch_size: int = 16, seed: int = 0, lora: bool = False) -> FineTune:
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"parameter 'steps' must be an integer >= 1, got {steps!r}")
    lr = check_finite("lr", lr)
    if lr <= 0:
        raise InputError(f"parameter 'lr' must be > 0, got {lr}")
    return FineTune(params={"steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed, "lora": lora},
                    steps=steps, lr=lr, batch_size=batch_size, seed=seed, lora=lora)


def mo_checkpoint(path: str | None = None) -> Checkpoint:
    if not path or not Path(path).exists():
        raise InputError(f"parameter 'path': checkpoint not found: {path!r}")
    return Checkpoint(params={"path": str(path)}, path=str(path))


