"""The embedded toy model: its behaviour targets, its data, and deterministic training."""

import pytest
import torch

from probing import load_model
from probing.datasets import toy as data
from probing.toy import WEIGHTS_DIR
from probing.toy.evaluate import TARGETS, behaviour, format_report, meets


@pytest.fixture(scope="module")
def toy():
    return load_model("toy")


@pytest.fixture(scope="module")
def report(toy):
    return behaviour(toy)


@pytest.mark.parametrize("name", list(TARGETS))
def test_behaviour_target(report, name):
    assert meets(name, report[name]), f"{name} = {report[name]:.3f}\n{format_report(report)}"


def test_shipped_artifact_is_small_and_offline():
    weights = WEIGHTS_DIR / "model.safetensors"
    assert weights.stat().st_size <= 10 * 2**20
    for f in ("config.json", "tokenizer.json", "processor_config.json"):
        assert (WEIGHTS_DIR / f).is_file(), f


def test_toy_is_a_llava(toy):
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    assert isinstance(toy.model, LlavaForConditionalGeneration)
    assert isinstance(toy.processor, LlavaProcessor)
    q = data.requests("test")[0]
    from probing import render_prompt

    assert render_prompt(toy.processor, q).startswith("USER: ") and render_prompt(toy.processor, q).endswith("ASSISTANT:")


def test_dataset_is_seeded_and_splits_differ():
    a, b = data.requests("test", seed=0), data.requests("test", seed=0)
    assert [q.text for q in a] == [q.text for q in b]
    img_a = next(q.image for q in a if q.image is not None)
    img_b = next(q.image for q in b if q.image is not None)
    assert img_a.tobytes() == img_b.tobytes()
    train_texts = {t for group in data.TEMPLATES["train"].values() for t in group}
    test_texts = {t for group in data.TEMPLATES["test"].values() for t in group}
    assert not train_texts & test_texts
    labels = {q.label for q in a}
    assert labels == {"harmful", "benign"}
    kinds = {q.meta["kind"] for q in a}
    assert kinds == {"text", "typo", "picture"}
    with pytest.raises(ValueError, match="split"):
        data.requests("dev")


def test_short_training_is_bitwise_deterministic():
    from probing.toy.train import train

    kw = dict(steps=3, batch_size=4, repeats=1, progress=False, vision_steps=3, vision_renders=1)
    m1, _, h1 = train(seed=0, **kw)
    m2, _, h2 = train(seed=0, **kw)
    assert h1 == h2
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    m3, _, h3 = train(seed=1, **kw)
    assert h3 != h1
