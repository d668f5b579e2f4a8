"""TransformerLens bridge interop: same hook names, same values, no run-time pip installs."""

import subprocess

import pytest
import torch

from hooks import capture, hook_name
from hooks.lens_bridge import _no_runtime_install, to_transformer_lens
from probing.render import encode


@pytest.fixture
def forbid_pip(monkeypatch):
    """Fail the test if anything spawns a pip (or uv pip) process."""
    calls = []

    def guard(real):
        def wrapped(cmd, *args, **kwargs):
            text = " ".join(map(str, cmd)) if isinstance(cmd, (list, tuple)) else str(cmd)
            if "pip" in text:
                calls.append(text)
                raise AssertionError(f"subprocess pip call attempted: {text}")
            return real(cmd, *args, **kwargs)
        return wrapped

    for name in ("Popen", "run", "call", "check_call", "check_output"):
        monkeypatch.setattr(subprocess, name, guard(getattr(subprocess, name)))
    yield calls
    assert not calls, f"pip was invoked: {calls}"


@pytest.fixture(scope="module")
def bridge(tiny):
    return to_transformer_lens(tiny)


def test_bridge_boot_makes_no_pip_call(tiny, forbid_pip):
    bridge = to_transformer_lens(tiny)
    assert bridge.processor is not None  # booted from the local processor files


def test_runtime_installer_is_switched_off(forbid_pip):
    from transformer_lens.model_bridge.sources.transformers import helpers

    with _no_runtime_install():
        assert helpers._ensure_torchvision() is False
    assert helpers._ensure_torchvision.__name__ == "_ensure_torchvision"


def test_bridge_cache_equals_our_capture(tiny, bridge, forbid_pip):
    enc = encode(tiny, ["USER: Tell me about rivers and mountains. ASSISTANT:"], [None])
    names = [hook_name(i, k) for i in range(tiny.n_layers)
             for k in ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out")]
    _, tl_cache = bridge.run_with_cache(enc["input_ids"], names_filter=names)
    with capture(tiny, names, "all") as ours, torch.no_grad():
        tiny.model(input_ids=enc["input_ids"], use_cache=False)  # the bundle's own, unwrapped model
    for name in names:
        torch.testing.assert_close(ours[name], tl_cache[name], atol=1e-5, rtol=0, msg=name)


def test_bridge_leaves_the_bundle_untouched(tiny, bridge, mixed_queries):
    """Booting wraps a copy: the bundle's modules, attention kernels and cache still work."""
    from probing import PromptSpec, RefusalScorer
    from probing.sweep import score_conditions

    assert tiny.model.config.text_config._attn_implementation == "sdpa"
    assert type(tiny.layers[0].self_attn).__name__ == "LlamaAttention"
    scorer = RefusalScorer(tiny, layers=None)
    conds = {"a": PromptSpec(), "b": PromptSpec(text_after="Be brief.")}
    swept = score_conditions(scorer, mixed_queries[:3], conds)
    torch.testing.assert_close(swept["b"].margin, scorer.score(mixed_queries[:3], prompt=conds["b"]).margin,
                               atol=1e-4, rtol=0)


def test_bridge_needs_local_processor_files(tiny):
    from dataclasses import replace

    with pytest.raises(ValueError, match="no local directory with processor files"):
        to_transformer_lens(replace(tiny, source_dir=None))


def test_bridge_boots_on_the_toy(forbid_pip):
    """The embedded toy boots too (its processor is saved as processor_config.json)."""
    from probing import load_model

    toy = load_model("toy")
    bridge = to_transformer_lens(toy)
    enc = encode(toy, ["USER: Tell me how to bake bread. ASSISTANT:"], [None])
    names = [hook_name(i) for i in range(toy.n_layers)]
    _, tl_cache = bridge.run_with_cache(enc["input_ids"], names_filter=names)
    with capture(toy, names, "all") as ours, torch.no_grad():
        toy.model(input_ids=enc["input_ids"], use_cache=False)
    for name in names:
        torch.testing.assert_close(ours[name], tl_cache[name], atol=1e-5, rtol=0, msg=name)
