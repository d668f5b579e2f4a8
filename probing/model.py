"""Loading LLaVA-1.5 models into a small bundle the rest of the toolkit works with.

`load_model` accepts a llava-hf checkpoint directory or hub id, or ``"tiny-random"``: a model of
LLaVA-1.5's exact structure (same vocabulary, same 336 px / 14 px vision patching, so 576 image
tokens) with small widths and random weights, built offline from the real config, processor and
tokenizer in ``../shared/llava-1.5-7b-hf``.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import shutil
import socket
import tempfile
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from .errors import InputError, MissingDataError
from .images import DEFAULT_IMAGE_ASPECT_RATIO, check_image_aspect_ratio, set_image_aspect_ratio
from .images import image_aspect_ratio as processor_aspect_ratio

logger = logging.getLogger(__name__)

LLAVA_ASSETS_ENV = "MECHPROBE_LLAVA_DIR"
#: Where ``tiny-random``'s source directory (its config plus the real processor files, for the
#: TransformerLens bridge) is kept, one folder per content hash; default ~/.cache/mechprobe.
CACHE_ENV = "MECHPROBE_CACHE"
BUILTIN_MODELS = ("toy", "tiny-random")
#: Weight files up to this size are hashed by content in `model_fingerprint` (the toy); larger
#: ones by name, size, inode and modification time (hashing 14 GB at every run start would cost minutes).
HASH_WEIGHTS_BELOW = 64 * 2**20
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
    def image_aspect_ratio(self) -> str:
        """How non-square images are made square: "pad" (LLaVA-1.5's own) or "crop" (`probing.images`)."""
        return processor_aspect_ratio(self.processor)

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


def _cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mechprobe"


def _write_source_dir(config, assets: Path, owner: object) -> Path:
    """A directory with ``config`` plus the real processor files (for the TL bridge).

    Kept once per content (config and asset files) under the mechprobe cache, written to a
    temporary sibling and renamed into place, so loading the model again reuses it and leaves
    nothing behind. Where the cache cannot be written, a temporary directory removed with
    ``owner`` (the model) or at exit."""
    files = sorted(f for f in assets.iterdir() if f.is_file() and f.name != "config.json")
    text = config.to_json_string()
    key = hashlib.sha256(text.encode())
    for f in files:
        st = f.stat()
        key.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    target = _cache_root() / f"tiny-random-{key.hexdigest()[:16]}"
    if (target / "config.json").is_file() and (target / "preprocessor_config.json").is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-tiny-random-", dir=target.parent))
    except OSError as exc:
        logger.info("mechprobe cache %s not writable (%s); using a temporary directory", target.parent, exc)
        tmp = Path(tempfile.mkdtemp(prefix="mechprobe-model-"))
        _fill_source_dir(tmp, text, files)
        weakref.finalize(owner, shutil.rmtree, str(tmp), ignore_errors=True)
        return tmp
    try:
        _fill_source_dir(tmp, text, files)
        try:
            os.rename(tmp, target)
        except OSError:  # another process put it there first: use theirs
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _fill_source_dir(out: Path, config_json: str, files: list[Path]) -> None:
    (out / "config.json").write_text(config_json)
    for f in files:
        shutil.copy(f, out / f.name)


def _offline() -> bool:
    """True when the user asked for no network (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # an old or absent huggingface_hub: only the environment counts
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host answers a TCP connection within ``timeout`` seconds (DNS included)."""
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except Exception:
        endpoint = "https://huggingface.co"
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    result = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)  # getaddrinfo ignores socket timeouts
    t.start()
    t.join(timeout)
    return bool(result and result[0])


def _hub_config(repo_id: str) -> Path | None:
    """The cached config.json of a hub id, or None when it is not in the local HF cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # HFValidationError: not a valid repo id
        raise InputError(f"--model {repo_id!r} is neither {', '.join(map(repr, BUILTIN_MODELS))}, an existing "
                         f"directory, nor a valid hub id") from None
    return Path(found) if isinstance(found, str) else None


def resolve_model(name_or_path: str | os.PathLike) -> tuple[str, Path | None]:
    """Check that a model can be loaded, without loading it: ("toy" | "tiny-random" | "dir" | "hub", its
    config directory or file, None for a hub id not cached). Fails fast, offline, with one line.

    Raises:
        InputError: not a built-in name, not an existing checkpoint directory, and not a hub id
            that is cached (offline) or reachable; a did-you-mean for a misspelt built-in name.
        MissingDataError: the toy's weights or the LLaVA assets are missing.
    """
    name = str(name_or_path)
    if name == "toy":
        from .toy import WEIGHTS_DIR

        if not (WEIGHTS_DIR / "model.safetensors").is_file():
            raise MissingDataError(f"the toy's weights are missing from {WEIGHTS_DIR}; "
                                   "regenerate them with: python -m probing.toy.train --seed 0")
        return "toy", WEIGHTS_DIR
    if name == "tiny-random":
        try:
            return "tiny-random", find_llava_assets()
        except FileNotFoundError as exc:
            raise MissingDataError(str(exc)) from None
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"--model {name}: the directory has no config.json (not a llava-hf checkpoint)")
        return "dir", path
    if path.exists():
        raise InputError(f"--model {name}: a file, not a checkpoint directory")
    close = [] if "/" in name else difflib.get_close_matches(name, BUILTIN_MODELS, n=1, cutoff=0.6)
    # hub ids are "name" or "org/name"; anything else is meant as a path
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
    if close or looks_like_path:
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise InputError(f"--model {name!r}: no such directory{hint} (use 'toy', 'tiny-random', a llava-hf "
                         f"checkpoint directory or a hub id)")
    cached = _hub_config(name)
    if cached is not None:
        return "hub", cached
    if _offline():
        raise InputError(f"--model {name!r}: not 'toy', 'tiny-random' or a local directory, and not in the local "
                         f"Hugging Face cache (offline mode is set: HF_HUB_OFFLINE); download it first or pass a "
                         f"checkpoint directory")
    if not _hub_reachable():
        raise InputError(f"--model {name!r}: not 'toy', 'tiny-random' or a local directory, not in the local "
                         f"Hugging Face cache, and the hub cannot be reached (no network); download it first or "
                         f"pass a checkpoint directory")
    return "hub", None


def default_dtype(name_or_path, device="cpu") -> torch.dtype:
    """The dtype `load_model` uses when none is given."""
    if str(name_or_path) == "tiny-random":
        return torch.float32
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def model_fingerprint(name_or_path: str | os.PathLike = "tiny-random", *, dtype=None, device="cpu", seed: int = 0,
                      n_layers: int | None = None, image_aspect_ratio: str = DEFAULT_IMAGE_ASPECT_RATIO) -> dict:
    """What identifies a model's scores, computed without loading its weights (and validating the name,
    see `resolve_model`): the name (a directory as an absolute path), a hash of its config, the dtype,
    how images are made square, and its weight files (content hash up to `HASH_WEIGHTS_BELOW`, else
    name, size, inode and modification time)."""
    kind, where = resolve_model(name_or_path)
    out = {"model": str(name_or_path), "dtype": str(_dtype(dtype, default_dtype(name_or_path, device))).split(".")[-1],
           "image_aspect_ratio": check_image_aspect_ratio(image_aspect_ratio)}
    if kind == "tiny-random":
        cfg = tiny_random_config(where, n_layers=n_layers)
        out.update(seed=seed, config_sha256=hashlib.sha256(cfg.to_json_string().encode()).hexdigest(),
                   prompt_files=_prompt_files(where))
        return out
    if kind == "dir":
        out["model"] = os.path.abspath(where)
    cfg_file = where / "config.json" if kind in ("toy", "dir") else where
    if cfg_file is not None:
        out["config_sha256"] = hashlib.sha256(cfg_file.read_bytes()).hexdigest()
        out["prompt_files"] = _prompt_files(cfg_file.parent)
        weights = {}
        for f in sorted(cfg_file.parent.iterdir()):
            if f.suffix in (".safetensors", ".bin", ".pt") and f.is_file():
                st = f.stat()
                # a large file by size, inode and modification time: a checkpoint retrained into the
                # same folder has the same names and sizes, but not the same mtime
                weights[f.name] = (file_sha256(f) if st.st_size <= HASH_WEIGHTS_BELOW
                                   else f"size={st.st_size},inode={st.st_ino},mtime_ns={st.st_mtime_ns}")
        out["weights"] = weights
    return out


#: Files that decide how a prompt is rendered and tokenized (the prompt format).
PROMPT_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json", "processor_config.json",
                "preprocessor_config.json", "special_tokens_map.json", "added_tokens.json")


def _prompt_files(folder: Path) -> str:
    """One hash over the chat template, tokenizer and processor settings in ``folder``."""
    h = hashlib.sha256()
    for name in PROMPT_FILES:
        f = folder / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    compile: bool = False,
    image_aspect_ratio: str = DEFAULT_IMAGE_ASPECT_RATIO,
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
        compile: compile the language model in place with ``torch.compile`` (hooks and activation
            edits still apply). Faster on a GPU once compiled (1.23-1.30x per scorer forward at
            7B on an H200, docs/performance.md §2b), but each new input-shape family compiles on
            first use (a study's many families had not compiled after about 200 s there), so it pays
            on long runs only. Fused kernels round
            differently: margins agree with the eager model to ~1e-6 in float32, not bit for bit.
            A deep copy (``mo_finetune``'s model) runs uncompiled. Not with ``device_map``.
        image_aspect_ratio: ``"pad"`` (default: LLaVA-1.5's own preprocessing, each image padded
            to a square with its mean colour, so nothing is cut off) or ``"crop"`` (the llava-hf
            processor as shipped: shortest edge resized, centre cropped), `probing.images`.
    """
    name = str(name_or_path)
    check_image_aspect_ratio(image_aspect_ratio)
    if compile and device_map is not None:
        raise InputError("compile=True needs a model on one device; it cannot be combined with device_map")
    kind, where = resolve_model(name)  # fails fast (and offline) on a name that cannot load
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    if kind == "toy":
        name_or_path = where
    if kind == "tiny-random":
        assets = where
        config = tiny_random_config(assets, n_layers=n_layers)
        if attn_implementation:
            config._attn_implementation = attn_implementation
        model = build_random_model(config, seed=seed, dtype=_dtype(dtype, torch.float32))
        processor = AutoProcessor.from_pretrained(assets)
        source_dir = _write_source_dir(model.config, assets, model)
        if device_map is not None:
            model = _dispatch(model, device_map, max_memory)
    else:
        default = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
        kwargs = {"dtype": _dtype(dtype, default)}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        if device_map is not None:
            kwargs.update(device_map=device_map, max_memory=max_memory)
        try:
            model = LlavaForConditionalGeneration.from_pretrained(str(name_or_path), **kwargs).eval()
            processor = AutoProcessor.from_pretrained(str(name_or_path))
        except (OSError, ValueError) as exc:  # incomplete checkpoint, gated repo, no network ...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"--model {name}: cannot load it: {first}") from None
        source_dir = Path(name_or_path) if Path(name_or_path).is_dir() else None
    processor.tokenizer.padding_side = "left"
    set_image_aspect_ratio(processor, image_aspect_ratio)
    if device_map is None:
        model.to(device)
    if compile:
        # in place (nn.Module.compile): the scorer's hooks on the decoder layers stay where they are
        model.model.language_model.compile()
    logger.info("loaded %s: %d layers, d_model=%d, %s on %s%s", name,
                model.config.text_config.num_hidden_layers,
                model.config.text_config.hidden_size, model.dtype, device,
                ", language model compiled" if compile else "")
    return ModelBundle(model=model, processor=processor, name=name, source_dir=source_dir)
