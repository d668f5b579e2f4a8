"""TransformerLens interop: the same HF model inside a ``TransformerBridge``.

Hook names agree with this package's (``blocks.{i}.hook_resid_post`` ...), so a user can move
between `hooks.capture` and ``bridge.run_with_cache`` on one set of weights.

transformer-lens 4.3 tries ``pip install torchvision`` at run time when it cannot load a
processor for the name it is booted from; that can replace a CPU torch with a multi-GB CUDA
build. We boot only from a local directory with the processor files, and switch that installer
off while booting.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from .errors import HookError

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _no_runtime_install():
    try:
        from transformer_lens.model_bridge.sources.transformers import helpers
    except ImportError:  # layout changed: nothing of ours to switch off
        yield
        return
    original = getattr(helpers, "_ensure_torchvision", None)
    if original is None:
        yield
        return

    def refuse() -> bool:
        logger.warning("transformer-lens wanted to pip-install torchvision at run time; refused")
        return False

    helpers._ensure_torchvision = refuse
    try:
        yield
    finally:
        helpers._ensure_torchvision = original


def to_transformer_lens(bundle, *, device=None, copy: bool = True):
    """A ``TransformerBridge`` over the bundle's model, booted from local files (no download).

    The bridge replaces the HF model's submodules with its own wrappers *in place* (which, for
    one, no longer fill a KV cache, so prefix-shared sweeps break). By default it therefore wraps
    a deep copy and the bundle stays untouched; ``copy=False`` shares the weights (half the
    memory, for 7B-scale models) at the price of handing the bundle's model over to the bridge.
    The attention implementation that the bridge forces to eager is restored on the bundle's
    config afterwards in that case, so the scorer keeps its kernels.
    """
    from transformer_lens.model_bridge import TransformerBridge

    source = bundle.source_dir
    if source is None or not any((Path(source) / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")):
        raise HookError(
            f"model {bundle.name!r} has no local directory with processor files; the "
            "TransformerLens bridge must boot from one (it would otherwise try to download "
            "or pip-install at run time)"
        )
    import copy as _copy

    model = _copy.deepcopy(bundle.model) if copy else bundle.model
    configs = (model.config, model.config.text_config, model.config.vision_config)
    attn = [getattr(c, "_attn_implementation", None) for c in configs]
    with _no_runtime_install():
        bridge = TransformerBridge.boot_transformers(
            str(source), hf_model=model, device=device or str(bundle.device), dtype=bundle.dtype
        )
    for cfg, impl in zip(configs, attn):
        if impl is not None and getattr(cfg, "_attn_implementation", None) != impl:
            cfg._attn_implementation = impl
    return bridge
