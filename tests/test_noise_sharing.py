"""NI perturbations computed in a thread pool and shared across conditions (`shared_perturbations`):
the same bytes as one query at a time, each query perturbed once per block, nothing kept after it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import defenses.noise as noise
from defenses import Compose, get_defense, ni_image_gaussian, ni_image_mask, ni_text_smooth
from defenses.noise import shared_perturbations
from probing.query import Query


def _queries(n: int = 5) -> list[Query]:
    rng = np.random.default_rng(0)
    out = [Query(f"q{i}", f"how do I do thing {i}?", image=Image.fromarray(rng.integers(0, 256, (40 + i, 48, 3),
                                                                                    dtype=np.uint8)))
           for i in range(n)]
    return out + [Query("t0", "a text-only request")]


def _bytes(variants) -> list[list[tuple]]:
    return [[(q.id, q.text, None if q.image is None else q.image.tobytes()) for q, _ in vs] for vs in variants]


@pytest.mark.parametrize("factory", [ni_image_gaussian, ni_image_mask, ni_text_smooth])
def test_pool_gives_the_bytes_of_one_query_at_a_time(factory, monkeypatch):
    qs = _queries()
    pooled = factory(k=3, rate=0.2, seed=5).transform(qs, None)
    alone = [factory(k=3, rate=0.2, seed=5).transform([q], None)[0] for q in qs]
    monkeypatch.setattr(noise, "MAX_PERTURB_THREADS", 1)
    serial = factory(k=3, rate=0.2, seed=5).transform(qs, None)
    assert _bytes(pooled) == _bytes(alone) == _bytes(serial)
    # the text-only query keeps one unchanged copy under the image defenses
    if factory is not ni_text_smooth:
        assert len(pooled[-1]) == 1 and pooled[-1][0][0] is qs[-1]


def _count_copies(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = noise.NoiseDefense._copies

    def spy(self, q):
        calls.append(q.id)
        return real(self, q)

    monkeypatch.setattr(noise.NoiseDefense, "_copies", spy)
    return calls


def test_shared_block_perturbs_each_query_once_across_conditions(monkeypatch):
    qs = _queries()
    ni = ni_image_gaussian(k=2, rate=0.1, seed=0)
    ensemble = Compose(members=[get_defense("sr_mmsafety"), ni])
    expect_ni, expect_both = _bytes(ni.transform(qs, None)), _bytes(ensemble.transform(qs, None))
    calls = _count_copies(monkeypatch)
    with shared_perturbations():
        got_ni = ni.transform(qs, None)
        got_both = ensemble.transform(qs, None)
        other = ni_image_gaussian(k=2, rate=0.1, seed=1).transform(qs, None)  # other parameters: its own
    assert _bytes(got_ni) == expect_ni and _bytes(got_both) == expect_both
    image_ids = [q.id for q in qs if q.has_image]
    assert sorted(calls) == sorted(image_ids * 2), "each image query once per distinct parameter set"
    assert _bytes(other) != expect_ni
    # outside the block nothing is remembered
    calls.clear()
    ni.transform(qs, None)
    assert sorted(calls) == sorted(image_ids)


def test_shared_block_tells_apart_same_id_with_another_image_or_text(monkeypatch):
    q = _queries(1)[0]
    other_image = Query(q.id, q.text, image=Image.new("RGB", (40, 48), (9, 9, 9)))
    other_text = Query(q.id, "another request", image=q.image)
    ni = ni_image_gaussian(k=2, rate=0.1, seed=0)
    with shared_perturbations():
        a, b, c = (ni.transform([x], None)[0] for x in (q, other_image, other_text))
    assert a[0][0].image.tobytes() != b[0][0].image.tobytes()
    assert c[0][0].text == "another request" and a[0][0].text == q.text
