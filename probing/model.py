"""Loading LLaVA-1.5 models into a small bundle the rest of the toolkit works with.

`load_model` accepts a llava-hf checkpoint directory or hub id, or ``"tiny-random"``: a model of
LLaVA-1.5's exact structure (same vocabulary, same 336 px / 14 px vision patching, so 576 image
tokens) with small widths and random weights, built offline from the real config, processor and
tokenizer in ``../shared/llava-1.5-7b-hf``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from .errors import InputError

logger = logging.getLogger(__name__)

LLAVA_ASSETS_ENV = "MECHPROBE_LLAVA_DIR"
_REPO_ROOT = Path(__file__).resolve().parents[1]

#: Shrunk widths for ``tiny-random``; everything else comes from the real LLaVA-1.5-7B config.
TINY_TEXT = dict(
    num_hidden_layers=4,
    hidden_size=64,
    intermediate_size=172,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=16,
    # Larger than the usual 0.02 so random logits spread over O(1) and exactness tests bite.
    initializer_range=0.08,
)
TINY_VISION = dict(
    num_hidden_layers=2,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=2,
    projection_dim=32,
)


def find_llava_assets() -> Path:
    """Directory holding the real LLaVA-1.5 processor, tokenizer and config (no weights).

    Looked up in ``$MECHPROBE_LLAVA_DIR``, then ``<repo>/../shared/llava-1.5-7b-hf``, then
    ``<repo>/shared/llava-1.5-7b-hf``.
    """
    candidates = []
    if os.environ.get(LLAVA_ASSETS_ENV):
        candidates.append(Path(os.environ[LLAVA_ASSETS_ENV]))
    candidates += [
        _REPO_ROOT.parent / "shared" / "llava-1.5-7b-hf",
        _REPO_ROOT / "shared" / "llava-1.5-7b-hf",
    ]
    for path in candidates:
        if (path / "config.json").is_file() and (path / "tokenizer_config.json").is_file():
            return path
    raise FileNotFoundError(
        "LLaVA-1.5 processor/config files not found; looked in "
        + ", ".join(str(p) for p in candidates)
        + f". Set ${LLAVA_ASSETS_ENV} to a directory holding them."
    )


@dataclass
class ModelBundle:
    """A LLaVA model, its processor, and the handles the probing code needs.

    Attributes:
        model: the HF ``LlavaForConditionalGeneration`` (eval mode).
        processor: its ``LlavaProcessor`` (tokenizer left-padded).
        name: what it was loaded from (``"tiny-random"``, a path or a hub id).
        source_dir: a local directory with config and processor files for this model (used to
            boot the TransformerLens bridge without any download); None if unknown.
    """

    model: nn.Module
    processor: object
    name: str
    source_dir: Path | None = None
    extra: dict = field(default_factory=dict)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def layers(self) -> nn.ModuleList:
        """Decoder layers of the language model, ``blocks.{i}`` in TransformerLens terms."""
        return self.language_model.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.language_model.norm

    @property
    def unembed(self) -> torch.Tensor:
        """Unembedding matrix ``[vocab, d_model]`` (``lm_head.weight``)."""
        return self.model.lm_head.weight

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return self.model.config.text_config.hidden_size

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    @property
    def image_seq_length(self) -> int:
        """Number of LM positions one image occupies (576 for LLaVA-1.5 at 336 px)."""
        vc = self.model.config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        if self.model.config.vision_feature_select_strategy == "full":
            n += 1
        return n

    @property
    def max_context(self) -> int:
        return self.model.config.text_config.max_position_embeddings

    @property
    def device(self) -> torch.device:
        """Where the unembedding (and so the readout) lives."""
        return self.unembed.device

    @property
    def input_device(self) -> torch.device:
        """Where input ids go: the token embedding's device (differs under a device map)."""
        return self.language_model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unembed.dtype


def _dtype(dtype: torch.dtype | str | None, default: torch.dtype) -> torch.dtype:
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[dtype]
    except KeyError:
        raise InputError(f"dtype={dtype!r} is not one of float32, float16, bfloat16") from None


def tiny_random_config(assets: Path | None = None, *, n_layers: int | None = None):
    """The real LLaVA-1.5-7B config with shrunk widths (see TINY_TEXT / TINY_VISION)."""
    from transformers import LlavaConfig

    cfg = LlavaConfig.from_pretrained(assets or find_llava_assets())
    for key, value in TINY_TEXT.items():
        setattr(cfg.text_config, key, value)
    if n_layers is not None:
        cfg.text_config.num_hidden_layers = n_layers
    for key, value in TINY_VISION.items():
        setattr(cfg.vision_config, key, value)
    return cfg


def build_random_model(config, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A ``LlavaForConditionalGeneration`` with seeded random weights, in eval mode."""
    from transformers import LlavaForConditionalGeneration

    # The shipped config says float16; build in the requested dtype instead.
    for c in (config, config.text_config, config.vision_config):
        c.dtype = dtype
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    return model.to(dtype).eval()


def _write_source_dir(config, assets: Path) -> Path:
    """A temp directory with ``config`` plus the real processor files (for the TL bridge)."""
    out = Path(tempfile.mkdtemp(prefix="mechprobe-model-"))
    config.save_pretrained(out)
    for f in assets.iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copy(f, out / f.name)
    return out


def _dispatch(model: nn.Module, device_map, max_memory) -> nn.Module:
    """Place an in-memory model's modules on devices with accelerate."""
    from accelerate import dispatch_model, infer_auto_device_map

    if isinstance(device_map, str):
        no_split = ["LlamaDecoderLayer", "CLIPEncoderLayer"]
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    model = dispatch_model(model, device_map=device_map)
    model.hf_device_map = device_map
    return model


def load_model(
    name_or_path: str | os.PathLike = "tiny-random",
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    seed: int = 0,
    n_layers: int | None = None,
    attn_implementation: str | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
) -> ModelBundle:
    """Load a LLaVA-1.5 model and its processor.

    Args:
        name_or_path: ``"toy"`` (the embedded safety-tuned toy), ``"tiny-random"``, a local
            llava-hf checkpoint directory, or a hub id
            (``llava-hf/llava-1.5-7b-hf``; needs the weights in the local HF cache when offline).
        device: where the model runs.
        dtype: weights dtype; float32 by default on CPU, bfloat16 on CUDA for checkpoints.
        seed: weight seed for ``tiny-random``.
        n_layers: number of decoder layers for ``tiny-random`` (default 4).
        attn_implementation: passed to transformers (default: its own choice, SDPA).
        device_map: place modules on several devices for models larger than one ("auto",
            "balanced", or a dict of module name -> device), through accelerate; ``device`` is
            then ignored. Captured activations are gathered where the final norm sits.
        max_memory: per-device budget for ``device_map="auto"`` (e.g. ``{0: "20GiB", "cpu": "60GiB"}``).
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    name = str(name_or_path)
    if name == "toy":
        from .toy import WEIGHTS_DIR

        if not (WEIGHTS_DIR / "model.safetensors").is_file():
            raise FileNotFoundError(f"the toy's weights are missing from {WEIGHTS_DIR}; "
                                    "regenerate them with: python -m probing.toy.train --seed 0")
        name_or_path = WEIGHTS_DIR
    if name == "tiny-random":
        assets = find_llava_assets()
        config = tiny_random_config(assets, n_layers=n_layers)
        if attn_implementation:
            config._attn_implementation = attn_implementation
        model = build_random_model(config, seed=seed, dtype=_dtype(dtype, torch.float32))
        processor = AutoProcessor.from_pretrained(assets)
        source_dir = _write_source_dir(model.config, assets)
        if device_map is not None:
            model = _dispatch(model, device_map, max_memory)
    else:
        default = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
        kwargs = {"dtype": _dtype(dtype, default)}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        if device_map is not None:
            kwargs.update(device_map=device_map, max_memory=max_memory)
        model = LlavaForConditionalGeneration.from_pretrained(str(name_or_path), **kwargs).eval()
        processor = AutoProcessor.from_pretrained(str(name_or_path))
        source_dir = Path(name_or_path) if Path(name_or_path).is_dir() else None
    processor.tokenizer.padding_side = "left"
    if device_map is None:
        model.to(device)
    logger.info("loaded %s: %d layers, d_model=%d, %s on %s", name,
                model.config.text_config.num_hidden_layers,
                model.config.text_config.hidden_size, model.dtype, device)
    return ModelBundle(model=model, processor=processor, name=name, source_dir=source_dir)
