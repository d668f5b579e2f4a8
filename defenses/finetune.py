"""Model Optimization (MO) defenses: a safety-tuned model replaces the original.

``mo_finetune`` tunes LoRA adapters (peft; r=8 on the attention's q and v projections) on the
language model with a plain PyTorch loop, VLGuard style: harmful requests in every delivery
(text, typography, picture) get refusal targets, benign requests the answer the toy's policy
gives in their context, half of the requests inside the contexts of the toy's instruction
tuning, mixed with ordinary data (captions) so the model keeps its skills (`safety_examples`).
Training data comes from the synthetic toy generator (never from MOSSBench or MM-SafetyBench). The adapters are the default
at every size: full fine-tuning of the toy wore off its following of safety instructions (the
SR+MO ensemble became less safe than SR alone; docs/toy.md), and at 7B full fine-tuning does not
fit one 80 GB GPU (docs/performance.md §8). ``lora=False`` fine-tunes fully (vision tower frozen);
``lora="auto"`` uses LoRA only above 1e9 language-model parameters, counted from the config on
the meta device. A LoRA copy shares the original's frozen weights instead of copying them
(`merge_adapters`, which the study runs before saving it, copies the adapted ones first).
``mo_checkpoint(path)`` uses an already safety-tuned checkpoint.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from probing.datasets import toy as data
from probing.errors import InputError
from probing.training import encode_example, fit, sampled_batches

from .base import Defense, check_finite, check_int

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


def safety_examples(seed: int = 0, repeats: int = 2, caption_share: float = 0.3,
                    context_share: float = 0.5) -> list[data.Example]:
    """VLGuard-style safety data from the toy generator: every harmful request (text, typography,
    picture) refused; plus ordinary data, so the tuned model keeps its skills.

    ``context_share`` of the requests stand inside the contexts of the toy's instruction tuning
    (safety instructions of generated wordings, neutral text and descriptions around the request,
    `data.in_context`), the rest bare under a plain or safety system prompt. A benign request gets
    the answer the toy's policy gives in that context (`data.refuses`: helped, or handled with the
    caution a safety instruction asks for; for the toy, the answer it was tuned to give), so that
    following safety instructions stays a skill of the tuned model: the SR+MO ensemble needs it
    (docs/toy.md). Captions are the ordinary data.
    """
    rng = random.Random(f"mo-{seed}")
    out = []
    for q in data.requests("train", seed + 1000, repeats=repeats):
        phrase = q.meta["phrase"]
        if rng.random() < context_share:
            query, system, safety, named = data.in_context(q, rng)
            kind = "text" if named else q.meta["kind"]
        else:
            query, system = q, rng.choice(data.PLAIN_SYSTEM + data.SAFETY_SYSTEM)
            safety, kind = system in data.SAFETY_SYSTEM, q.meta["kind"]
        refuse = q.label == "harmful" or data.refuses(q.label, kind, phrase, safety, q.meta.get("trigger"))
        out.append(data.Example(query, system, data.answer(refuse, phrase, rng)))
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
    lora: bool | str = True
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

    def identity(self) -> dict:
        """What makes the tuned model what it is beyond the model it was tuned from (kept in the
        tuned bundle's ``extra["identity"]``: caches of what that model generated are keyed by it)."""
        return {"defense": self.name, "params": json.loads(json.dumps(self.params, default=str))}

    def _tune(self, bundle):
        lora = use_lora(self.lora, bundle.model.config)
        logger.info("mo_finetune: %s", "LoRA adapters" if lora else "full fine-tuning (vision tower frozen)")
        self.used_lora = lora
        with seeded_rng(self.seed):
            if lora:
                model = lora_copy(bundle.model)
            else:
                model = copy.deepcopy(bundle.model)
                for p in model.model.vision_tower.parameters():
                    p.requires_grad_(False)
            params = [p for p in model.parameters() if p.requires_grad]
            encoded = [encode_example(bundle.processor, e) for e in safety_examples(self.seed)]
            fit(model, params, encoded, steps=self.steps, lr=self.lr, warmup=max(1, self.steps // 10),
                batches=sampled_batches(len(encoded), self.batch_size, random.Random(f"mo-order-{self.seed}")),
                pad_id=bundle.processor.tokenizer.pad_token_id,
                optimizer=torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0),
                device=bundle.input_device, log_every=20, name="mo_finetune")
        return self._wrap(bundle, model)

    def _wrap(self, bundle, model):
        from probing.model import ModelBundle

        for p in model.parameters():
            p.requires_grad_(False)
        return ModelBundle(model, bundle.processor, f"{bundle.name}+mo_finetune", bundle.source_dir,
                           extra={"identity": self.identity()})

    def from_adapters(self, bundle, tensors: dict[str, torch.Tensor]):
        """The LoRA copy of ``bundle`` this defense tuned, rebuilt from its adapters (`adapter_tensors`
        of it): the same weights, bit for bit, without training. The copy's LoRA initialisation is
        drawn under a forked, seeded RNG (the global RNG is untouched) and then overwritten."""
        with seeded_rng(self.seed):
            model = lora_copy(bundle.model)
        lm = model.model.language_model
        expected = set(adapter_tensors(model))
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise InputError(f"saved LoRA adapters do not fit this model: missing {missing[:3]}, "
                             f"unexpected {extra[:3]} ({len(missing)} and {len(extra)} in all)")
        named = dict(lm.named_parameters())
        wrong = [(k, tuple(v.shape), tuple(named[k].shape)) for k, v in tensors.items() if v.shape != named[k].shape]
        if wrong:
            key, got, want = wrong[0]
            raise InputError(f"saved LoRA adapters do not fit this model: {key} is {list(got)}, the model's "
                             f"{list(want)} ({len(wrong)} such in all)")
        with torch.no_grad():
            for key, value in tensors.items():
                named[key].copy_(value)
        self.used_lora = True
        return self._wrap(bundle, model)


@contextmanager
def seeded_rng(seed: int):
    """Run under a forked RNG state seeded with ``seed``: the CPU generator's (LoRA init draws from
    it) and, when CUDA is initialised (a model on a GPU), every CUDA device's (dropout in training;
    LoRA init on a GPU). A defense never changes the global torch RNG; torch.manual_seed would also
    seed CUDA devices fork_rng does not restore, or queue a seed for when CUDA starts."""
    cuda = torch.cuda.is_initialized()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if cuda else []):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed_all(seed)
        yield


def lora_copy(model):
    """A copy of ``model`` with LoRA adapters (r=8, alpha 16, q_proj and v_proj) on its language
    model; only the adapters train. Every original weight stays frozen: the copy's parameters are
    new, frozen Parameter objects on the original's storage (tied weights stay tied; the original's
    own flags are untouched), so the copy costs the adapters, not a second copy of the model."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise InputError("mo_finetune with LoRA needs peft (a mechprobe dependency): pip install peft; "
                         "or mo_finetune(lora=False)") from exc
    memo = {id(p): torch.nn.Parameter(p.detach(), requires_grad=False) for p in model.parameters()}
    memo.update({id(b): b for b in model.buffers()})
    copied = copy.deepcopy(model, memo)
    for p in copied.parameters():  # only the adapters train
        p.requires_grad_(False)
    with warnings.catch_warnings():  # peft still reads a property transformers 5 deprecates
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        copied.model.language_model = get_peft_model(
            copied.model.language_model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    return copied


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    """The LoRA adapter weights of a `lora_copy` (before `merge_adapters`), by their names in its
    language model: all a tuned copy adds to the model it was copied from (4.2e6 numbers at 7B, 17
    MB in float32, against 13.5 GB for the merged model). Empty for a model without adapters."""
    lm = model.model.language_model
    if not hasattr(lm, "merge_and_unload"):
        return {}
    return {n: p.detach() for n, p in lm.named_parameters() if "lora_" in n}


def merge_adapters(tuned) -> None:
    """Merge a `FineTune` LoRA copy's adapters into its language model, in place, so that it
    saves and loads as a plain model; the original model is left as it was.

    The copy's frozen weights share the original's storage (`FineTune._tune`), and peft's
    ``merge_and_unload`` adds each adapter's delta to its base weight in place, which would tune
    the original too: every condition scored on it afterwards would be scored on the fine-tuned
    weights. So each adapted layer gets its own copy of its base weight first (the q and v
    projections only: the memory of those two matrices per layer). A model without adapters is
    left alone."""
    lm = tuned.model.model.language_model
    if not hasattr(lm, "merge_and_unload"):
        return
    for module in lm.modules():
        base = getattr(module, "base_layer", None)
        if base is not None and hasattr(module, "lora_A"):
            base.weight = torch.nn.Parameter(base.weight.detach().clone(), requires_grad=False)
            if getattr(base, "bias", None) is not None:
                base.bias = torch.nn.Parameter(base.bias.detach().clone(), requires_grad=False)
    tuned.model.model.language_model = lm.merge_and_unload()


@dataclass
class Checkpoint(Defense):
    name: str = "mo_checkpoint"
    category: str = "MO"
    path: str = ""
    _cache: dict = field(default_factory=dict, repr=False)

    def model(self, bundle):
        if "bundle" not in self._cache:
            from probing.model import load_model

            self._cache["bundle"] = load_model(self.path, device=bundle.input_device, dtype=bundle.dtype,
                                               image_aspect_ratio=bundle.image_aspect_ratio)
            # what it generates is cached under its weights (`experiments.kept.CachedRewrite`)
            self._cache["bundle"].extra["identity"] = {"checkpoint": self.weights()}
        return self._cache["bundle"]

    def weights(self) -> dict:
        """The checkpoint's `probing.model.model_fingerprint` (config and weight files), computed
        once. Part of the defense's record, so scores made with a checkpoint retrained at the same
        path are not those of the new one (a run directory scores it again)."""
        if "fingerprint" not in self._cache:
            from probing.model import model_fingerprint

            self._cache["fingerprint"] = model_fingerprint(self.path)
        return self._cache["fingerprint"]

    def describe(self) -> dict:
        return {**super().describe(), "checkpoint": self.weights()}


def mo_finetune(steps: int = 120, lr: float = 1e-3, batch_size: int = 16, seed: int = 0,
                lora: bool | str = True) -> FineTune:
    """Safety fine-tuning; ``lora``: True (LoRA adapters, the default), False (full fine-tuning),
    or "auto" (LoRA above 1e9 language-model parameters)."""
    check_int("steps", steps, 1)
    check_int("batch_size", batch_size, 1)
    check_int("seed", seed, 0)
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


