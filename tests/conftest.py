"""Shared fixtures: offline mode, the real LLaVA-1.5 processor, a tiny random LLaVA model."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from probing import Query, load_model
from probing.model import find_llava_assets


def _assets_or_skip():
    try:
        return find_llava_assets()
    except FileNotFoundError as exc:
        pytest.skip(f"needs ../shared/llava-1.5-7b-hf (the real LLaVA-1.5 processor): {exc}")


@pytest.fixture(scope="session")
def llava_assets():
    return _assets_or_skip()


@pytest.fixture(scope="session")
def processor(llava_assets):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(llava_assets)


@pytest.fixture(scope="session")
def tiny(llava_assets):
    """4-layer random LLaVA with the real processor (576 image tokens)."""
    return load_model("tiny-random", seed=0)


def noise_image(seed: int, size=(360, 300)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture
def no_forward(monkeypatch):
    """Any model load or forward pass fails the test: a command's checks of its input must all
    come first (experiments load through `experiments.common`, `mechprobe score` through
    `probing.model`)."""
    import experiments.common as common
    import probing.model
    from probing import scorer as scorer_mod

    def boom(*args, **kwargs):
        raise AssertionError("a forward pass (or model load) ran before the bad input was found")

    for owner, name in ((probing.model, "load_model"), (common, "load_model"),
                        (scorer_mod.RefusalScorer, "forward"), (scorer_mod.RefusalScorer, "score")):
        monkeypatch.setattr(owner, name, boom)


@pytest.fixture
def mixed_queries():
    """Nine queries mixing text lengths, with and without images."""
    texts = [
        "How do I bake bread?",
        "Explain, step by step and in detail, how a bicycle gear system works and why it matters.",
        "Hi",
        "What is shown in this picture?",
        "Describe the image.",
        "Tell me a long story about a dragon who learned to cook pasta in a small Italian village.",
        "Summarise the text in the image, please.",
        "Is this safe?",
        "Write a poem about the sea at night under a full moon with stars.",
    ]
    queries = []
    for i, text in enumerate(texts):
        image = noise_image(i, size=(300 + 20 * i, 280 + 10 * i)) if i % 3 != 0 else None
        label = "harmful" if i % 2 else "benign"
        queries.append(Query(f"q{i}", text, image=image, label=label))
    return queries
