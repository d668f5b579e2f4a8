"""The scorer's data pipeline: prefetching and the pixel cache change no bit of any score, errors
surface naming the query, no worker thread outlives `score`."""

import os
import threading
import time

import pytest
import torch

from hooks import capture, hook_name
from hooks.capture import DecisionCapture
from probing import PromptSpec, Query, RefusalScorer
from probing.errors import ScoringError
from probing.pipeline import PixelCache, Prefetcher, encode_batch, image_key, process_image
from probing.query import QueryError
from probing.render import encode, render_prompt

from .conftest import noise_image


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name.startswith("mechprobe-prefetch")]


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture
def file_queries(tmp_path, mixed_queries):
    """The mixed queries with their images as PNG files, plus a JPEG."""
    out = []
    for q in mixed_queries:
        if q.image is not None:
            path = tmp_path / f"{q.id}.png"
            q.image.save(path)
            q = Query(q.id, q.text, image=path, label=q.label)
        out.append(q)
    noise_image(42, size=(500, 380)).save(tmp_path / "big.jpg", quality=90)
    out.append(Query("jpeg", "And this one?", image=tmp_path / "big.jpg", label="benign"))
    return out


# -- the prefetcher ------------------------------------------------------------------------------

def test_prefetcher_keeps_order_and_joins():
    with Prefetcher(lambda x: x * x, range(20), depth=2) as feed:
        assert prefetch_threads()
        assert list(feed) == [x * x for x in range(20)]
    assert not prefetch_threads()
    with Prefetcher(lambda x: x + 1, range(5), depth=0) as feed:  # inline
        assert not prefetch_threads()
        assert list(feed) == [1, 2, 3, 4, 5]


def test_prefetcher_yields_a_ready_first_result_without_computing_it():
    """``first``: item 0's result computed ahead (the study's plan-ahead worker): yielded as it
    is, never computed again; the others computed as usual (in the worker when there are several,
    inline for a lone item)."""
    import threading

    seen = []

    def fn(x):
        seen.append((x, threading.current_thread().name))
        return x * 10

    with Prefetcher(fn, [1, 2, 3], depth=2, first="ready", name="mechprobe-prefetch[first]") as feed:
        assert list(feed) == ["ready", 20, 30]
    assert seen == [(2, "mechprobe-prefetch[first]"), (3, "mechprobe-prefetch[first]")]
    seen.clear()
    for depth, eager in ((2, True), (2, False), (0, False)):
        with Prefetcher(fn, [1], depth=depth, eager=eager, first="ready") as feed:
            assert not prefetch_threads()  # nothing left to compute: no worker
            assert list(feed) == ["ready"]
    with Prefetcher(fn, [1, 2], depth=0, first="ready") as feed:
        assert list(feed) == ["ready", 20]
    with Prefetcher(fn, [], depth=2, first="ready") as feed:  # no items: nothing to yield
        assert list(feed) == []
    assert seen == [(2, threading.current_thread().name)] and not prefetch_threads()


def test_prefetcher_raises_in_the_consumer_and_stops():
    def fn(x):
        if x == 3:
            raise ValueError("item 3 is bad")
        return x

    seen = []
    with pytest.raises(ValueError, match="item 3 is bad"):
        with Prefetcher(fn, range(10), depth=2) as feed:
            for x in feed:
                seen.append(x)
    assert seen == [0, 1, 2] and not prefetch_threads()


def test_prefetcher_joins_when_the_consumer_stops_early():
    calls = []

    def slow(x):
        calls.append(x)
        time.sleep(0.01)
        return x

    with pytest.raises(KeyboardInterrupt):
        with Prefetcher(slow, range(100), depth=2) as feed:
            for x in feed:
                if x == 2:
                    raise KeyboardInterrupt
    assert not prefetch_threads()
    assert len(calls) <= 2 + 2 + 2  # bounded: consumed + queue depth + the one in flight


def test_an_eager_prefetcher_prepares_a_single_item_while_the_caller_works():
    """``eager``: one item is computed in the worker from the moment the block is entered (the
    prefix-shared batches of a study chunk are prepared while its other rows are scored); without
    it a single item is computed inline when asked for."""
    import threading

    where, started = [], threading.Event()

    def fn(x):
        where.append(threading.current_thread().name)
        started.set()
        return x + 1

    with Prefetcher(fn, [1], depth=2, eager=True, name="mechprobe-prefetch[eager]") as feed:
        assert started.wait(5)  # computed before anything is asked
        assert list(feed) == [2]
    with Prefetcher(fn, [1], depth=2) as feed:
        assert list(feed) == [2]
    assert where == ["mechprobe-prefetch[eager]", threading.current_thread().name]
    assert not prefetch_threads()


def test_host_results_are_written_in_place_after_flush():
    """`HostResults` (the scoring loops' copies to the host): every batch's rows land at their
    indices, hidden states as float32; on the CPU at once, the last one at the latest by `flush`."""
    from probing.pipeline import HostResults

    margin, lens, hidden = torch.zeros(5), torch.zeros(5, 2), torch.zeros(5, 2, 3)
    out = HostResults(margin, lens, hidden)
    out.add(torch.tensor([4, 0]), torch.tensor([1.0, 2.0]), torch.ones(2, 2), torch.ones(2, 2, 3, dtype=torch.bfloat16))
    out.add(torch.tensor([2]), torch.tensor([3.0]), torch.full((1, 2), 2.0), torch.full((1, 2, 3), 2.0))
    out.flush()
    assert margin.tolist() == [2.0, 0.0, 3.0, 0.0, 1.0]
    assert lens[[0, 2, 4], 0].tolist() == [1.0, 2.0, 1.0] and hidden.dtype == torch.float32
    assert hidden[2].eq(2).all() and hidden[1].eq(0).all()


# -- encoding with cached pixels -----------------------------------------------------------------

def test_encode_batch_equals_encode(tiny, file_queries):
    scorer = RefusalScorer(tiny)
    prompts = scorer.render(file_queries)
    want = encode(tiny, prompts, [q.load_image() for q in file_queries])
    cache = PixelCache()
    for _ in range(2):  # misses, then hits
        got = encode_batch(tiny, prompts, file_queries, cache)
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k]), k
    assert cache.hits == cache.misses == sum(q.has_image for q in file_queries)


@pytest.mark.parametrize("side", ["left", "right"])
def test_encode_pixels_expands_remembered_ids_as_the_processor_tokenizes(tiny, mixed_queries, side):
    """`encode_pixels` expands each prompt's unexpanded ids instead of tokenizing 576 image tokens:
    the same ids and mask as the processor's call, for text-only and image rows of different
    lengths, with a system prompt, on either padding side."""
    from probing.render import encode_pixels

    specs = [PromptSpec(), PromptSpec(system_prompt="You are a careful assistant.", text_after="Answer briefly.")]
    prompts = [render_prompt(tiny.processor, q, specs[i % 2]) for i, q in enumerate(mixed_queries)]
    images = [q.load_image() for q in mixed_queries]
    pixels = [process_image(tiny, im) if im is not None else None for im in images]
    before = tiny.tokenizer.padding_side
    tiny.tokenizer.padding_side = side
    try:
        want = encode(tiny, prompts, images)
        got = encode_pixels(tiny, prompts, pixels)
    finally:
        tiny.tokenizer.padding_side = before
    assert not want["attention_mask"].all()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_cache_keys_cannot_be_reused_wrongly(tmp_path):
    path = tmp_path / "a.png"
    noise_image(1).save(path)
    key1, _ = image_key(Query("a", "x", image=path))
    assert image_key(Query("b", "y", image=str(path)))[0] == key1  # same file, another query
    os.utime(path, ns=(1, 1))
    assert image_key(Query("a", "x", image=path))[0] != key1  # touched
    noise_image(2).save(path)
    os.utime(path, ns=(1, 1))  # same size, mtime set back: ctime still tells
    key2 = image_key(Query("a", "x", image=path))[0]
    assert key2 != key1
    im = noise_image(3)
    k1 = image_key(Query("c", "x", image=im))[0]
    assert image_key(Query("d", "x", image=noise_image(3)))[0] == k1  # same pixels, another object
    im.putpixel((0, 0), (1, 2, 3))
    assert image_key(Query("c", "x", image=im))[0] != k1  # changed in place


def test_pixel_cache_is_a_bounded_lru():
    entry = torch.zeros(1024, dtype=torch.float32)  # 4 KiB
    cache = PixelCache(max_bytes=3 * 4096)
    for i in range(3):
        cache.put(i, entry)
    assert cache.get(0) is entry  # 0 is now the most recent
    cache.put(3, entry)
    assert len(cache) == 3 and cache.bytes == 3 * 4096 and cache.get(1) is None and cache.get(0) is entry
    off = PixelCache(0)
    off.put("x", entry)
    assert not off.enabled and off.get("x") is None and len(off) == 0


# -- the scorer: same bits with prefetch and cache on or off -----------------------------------

def test_scores_bit_identical_with_prefetch_and_cache(tiny, file_queries, mixed_queries):
    for queries in (file_queries, mixed_queries):
        plain = RefusalScorer(tiny, batch_size=3, keep_hidden=True, prefetch=0, pixel_cache=0).score(queries)
        fast = RefusalScorer(tiny, batch_size=3, keep_hidden=True, prefetch=2)
        for _ in range(2):  # second run: every image from the cache
            got = fast.score(queries)
            assert torch.equal(got.margin, plain.margin)
            assert torch.equal(got.lens_margin, plain.lens_margin)
            assert torch.equal(got.hidden, plain.hidden)
        assert fast.pixel_cache.hits == sum(q.has_image for q in queries)
        assert set(fast.last_timing) == {"batches", "total_s", "wait_s", "forward_s"}
    assert not prefetch_threads()


def test_conditions_reuse_pixels(tiny, mixed_queries):
    """The same images under several prompt conditions are processed once."""
    scorer = RefusalScorer(tiny, batch_size=4, layers=None)
    n_images = sum(q.has_image for q in mixed_queries)
    for spec in (PromptSpec(), PromptSpec(system_prompt="Be safe."), PromptSpec(text_after="Think first.")):
        scorer.score(mixed_queries, prompt=spec)
    assert scorer.pixel_cache.misses == n_images and scorer.pixel_cache.hits == 2 * n_images
    # a fine-tuned copy with the same processor shares the cache
    assert scorer.with_bundle(tiny).pixel_cache is scorer.pixel_cache


def test_worker_errors_name_the_query_and_leave_nothing_behind(tiny, tmp_path, mixed_queries, monkeypatch):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    queries = mixed_queries + [Query("cat-9", "What is this?", image=bad)]
    before = hook_count(tiny.model)
    with pytest.raises(QueryError, match=r"cat-9.*broken\.png"):
        RefusalScorer(tiny, batch_size=2).score(queries)
    assert not prefetch_threads() and hook_count(tiny.model) == before

    import probing.pipeline

    def fail(bundle, image):
        raise RuntimeError("processor exploded")

    monkeypatch.setattr(probing.pipeline, "process_image", fail)
    with pytest.raises(ScoringError, match=r"preparing queries \[.*'q1'.*processor exploded"):
        RefusalScorer(tiny, batch_size=2).score(mixed_queries)
    assert not prefetch_threads() and hook_count(tiny.model) == before


def test_interrupt_during_scoring_joins_the_worker_and_removes_hooks(tiny, mixed_queries, monkeypatch):
    scorer = RefusalScorer(tiny, batch_size=2)
    before = hook_count(tiny.model)
    calls = []
    real = scorer.forward

    def forward(inputs, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(inputs, **kw)

    monkeypatch.setattr(scorer, "forward", forward)
    with pytest.raises(KeyboardInterrupt):
        scorer.score(mixed_queries)
    assert not prefetch_threads() and hook_count(tiny.model) == before


# -- the hot path's hooks ------------------------------------------------------------------------

def test_decision_capture_equals_capture(tiny, mixed_queries):
    scorer = RefusalScorer(tiny)
    inputs = encode(tiny, scorer.render(mixed_queries[:5]), [q.load_image() for q in mixed_queries[:5]])
    names = [hook_name(i) for i in range(tiny.n_layers)]
    reader = DecisionCapture(tiny, range(tiny.n_layers))
    before = hook_count(tiny.model)
    with torch.no_grad():
        with capture(tiny, names, "decision") as cache:
            tiny.model.model(**inputs, use_cache=False)
        with reader:
            with reader:  # nested: the same hooks
                assert hook_count(tiny.model) == before + tiny.n_layers + 1
                out = tiny.model.model(**inputs, use_cache=False)
            assert reader.active
    assert not reader.active and hook_count(tiny.model) == before
    assert torch.equal(reader.hidden(), torch.stack([cache[n] for n in names], 1))
    assert torch.equal(reader.select(out.last_hidden_state), out.last_hidden_state[:, -1])
    with pytest.raises(RuntimeError, match="boom"):
        with reader:
            raise RuntimeError("boom")
    assert hook_count(tiny.model) == before


# -- the image-feature cache -------------------------------------------------------------------

def test_feature_cache_runs_each_image_through_the_vision_tower_once(tiny, mixed_queries):
    """Against scoring with no cache at all: the first pass is the same bits; later conditions,
    in other batch compositions, reuse the features (hits counted) and agree to float rounding."""
    n_images = sum(q.has_image for q in mixed_queries)
    calls = []
    handle = tiny.model.model.vision_tower.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        cached = RefusalScorer(tiny, batch_size=3, keep_hidden=True)
        for batch_size, spec in ((3, PromptSpec()), (4, PromptSpec(system_prompt="Be safe.")),
                                 (2, PromptSpec(text_after="Think first."))):
            cached.batch_size = batch_size
            got = cached.score(mixed_queries, prompt=spec)
            want = RefusalScorer(tiny, batch_size=batch_size, keep_hidden=True, pixel_cache=0,
                                 feature_cache=0).score(mixed_queries, prompt=spec)
            if spec == PromptSpec():
                assert torch.equal(got.margin, want.margin) and torch.equal(got.hidden, want.hidden)
            torch.testing.assert_close(got.margin, want.margin, rtol=0, atol=1e-5)
            torch.testing.assert_close(got.lens_margin, want.lens_margin, rtol=0, atol=1e-5)
    finally:
        handle.remove()
    # the cached scorer's share of the vision tower calls: each image once
    assert cached.feature_cache.misses == n_images and cached.feature_cache.hits == 2 * n_images
    assert sum(calls) == n_images + 3 * n_images  # cached scorer once; each uncached reference scorer


def test_feature_cache_runs_only_the_missing_images_from_host_pixels(tiny, mixed_queries):
    """`cached_image_inputs` with the pixels still on the host (as `score` hands them over): the
    vision tower sees exactly the images the cache lacks, and the embeddings are the trunk's own
    (the same as with every feature computed afresh)."""
    from probing.pipeline import cached_image_inputs, image_features, vision_version

    images = [q for q in mixed_queries if q.has_image][:3]
    assert len(images) == 3
    scorer = RefusalScorer(tiny, batch_size=4)
    cpu = encode_batch(tiny, scorer.render(images), images, None, device="cpu")
    keys = [("test", q.id) for q in images]
    version = vision_version(tiny.model)
    with torch.inference_mode():
        fresh = image_features(tiny.model, cpu["pixel_values"])
        cache = PixelCache(2**26)
        cache.put((keys[1], version), fresh[1].clone())
        seen = []
        handle = tiny.model.model.vision_tower.register_forward_hook(lambda m, a, o: seen.append(a[0].clone()))
        try:
            got = cached_image_inputs(tiny.model, dict(cpu), keys, cache, version)
        finally:
            handle.remove()
        want = cached_image_inputs(tiny.model, dict(cpu), keys, PixelCache(2**26), version)
    assert len(seen) == 1 and torch.equal(seen[0], cpu["pixel_values"][[0, 2]].to(seen[0].dtype))
    assert "pixel_values" not in got and torch.equal(got["inputs_embeds"], want["inputs_embeds"])
    assert cache.get((keys[0], version)) is not None and cache.get((keys[2], version)) is not None


def test_feature_cache_is_not_reused_after_the_vision_weights_change(tiny, mixed_queries):
    scorer = RefusalScorer(tiny, batch_size=4, layers=None)
    before = scorer.score(mixed_queries)
    proj = tiny.model.model.multi_modal_projector.linear_1.weight
    try:
        with torch.no_grad():
            proj.add_(0.5)  # in place: same tensor object, new version
        after = scorer.score(mixed_queries)
        fresh = RefusalScorer(tiny, batch_size=4, layers=None, feature_cache=0).score(mixed_queries)
        assert torch.equal(after.margin, fresh.margin) and not torch.equal(after.margin, before.margin)
    finally:
        with torch.no_grad():
            proj.sub_(0.5)
    assert scorer.feature_cache.hits == 0


def test_sweep_prefix_pass_uses_the_feature_cache(tiny, mixed_queries):
    from probing.sweep import score_conditions

    specs = {"a": PromptSpec(), "b": PromptSpec(text_after="Be safe.")}
    scorer = RefusalScorer(tiny, batch_size=4, layers=None)
    first = score_conditions(scorer, mixed_queries, specs)
    again = score_conditions(scorer, mixed_queries, specs)
    n_images = sum(q.has_image for q in mixed_queries)
    assert scorer.feature_cache.misses == n_images and scorer.feature_cache.hits == n_images
    for name in specs:
        assert torch.equal(first[name].margin, again[name].margin)
        plain = RefusalScorer(tiny, batch_size=4, layers=None, feature_cache=0).score(mixed_queries,
                                                                                      prompt=specs[name])
        torch.testing.assert_close(first[name].margin, plain.margin, rtol=0, atol=1e-4)


def test_keep_policy_serves_the_first_images_on_every_pass():
    """A repeated scan over more images than fit: LRU ends with no hits, "keep" serves what fits."""
    for policy, want_hits in (("lru", 0), ("keep", 2 * 3)):
        cache = PixelCache(3 * 4 * 4, policy=policy)  # room for 3 float32 [4] tensors... of 4 bytes each
        for _ in range(3):  # three conditions, the same 5 images in the same order
            for k in range(5):
                if cache.get(k) is None:
                    cache.put(k, torch.zeros(4))
        assert cache.hits == want_hits, (policy, cache.hits)
    with pytest.raises(Exception, match="policy"):
        PixelCache(10, policy="fifo")


def test_study_caches_hold_every_image_of_the_run(tiny):
    from experiments.study import image_caches

    pixels, features = image_caches(tiny, 10)
    assert pixels.policy == "keep" and features.policy == "lru"  # every image fits
    per_feature = tiny.image_seq_length * tiny.d_model * 4  # float32
    assert 10 * per_feature <= features.max_bytes < 10 * per_feature + 2 * 2**20
    assert pixels.max_bytes >= 10 * 3 * 336 * 336 * 4


def test_study_feature_cache_takes_at_most_a_tenth_of_an_accelerator(tiny, monkeypatch):
    import experiments.study as study

    monkeypatch.setattr(study, "device_memory", lambda device: 24 * 2**30)  # a 24 GiB card
    _, features = study.image_caches(tiny, 10**6)  # far more images than fit
    assert features.max_bytes <= 24 * 2**30 // 10 + 2**20 and features.policy == "keep"
    pixels, _ = study.image_caches(tiny, 10**6)
    assert pixels.max_bytes == study.IMAGE_CACHE_CAP_MB * 2**20 + 2**20


def test_staged_images_are_encoded_without_hashing_or_processing_again(tiny, file_queries, mixed_queries, monkeypatch):
    """`PixelCache.stage_images` (the study's chunk built ahead): `encode_batch` then gives what
    `encode` gives, bit for bit, without computing an in-memory image's key or pixels again; file
    images are stored in the cache; a full cache stages beside its budget; `unstage` drops them."""
    import probing.pipeline as pipeline

    from PIL import Image

    queries = [*mixed_queries, *(Query(f"file-{q.id}", q.text, q.image, q.label) for q in file_queries)]
    scorer = RefusalScorer(tiny)
    prompts = scorer.render(queries)
    want = encode(tiny, prompts, [q.load_image() for q in queries])
    in_memory = [q for q in queries if isinstance(q.image, Image.Image)]
    files = [q for q in queries if q.has_image and q not in in_memory]
    assert in_memory and files
    for budget in (2**30, 0 + 1):  # room for all, and a cache too small to store anything
        cache = PixelCache(budget, policy="keep")
        staged = cache.stage_images(tiny, queries, threads=2, keep=queries)
        assert [id(i) for i in staged] == [id(q.image) for q in in_memory]
        assert len(cache) == (len(in_memory) + len(files) if budget > 1 else 0)
        calls = []
        real_key, real_process = pipeline.image_key, pipeline.process_image
        monkeypatch.setattr(pipeline, "image_key", lambda q: calls.append(q.id) or real_key(q))
        monkeypatch.setattr(pipeline, "process_image", lambda b, im: calls.append("process") or real_process(b, im))
        keys: list = []
        got = encode_batch(tiny, prompts, queries, cache, keys=keys)
        monkeypatch.setattr(pipeline, "image_key", real_key)
        monkeypatch.setattr(pipeline, "process_image", real_process)
        for k in want:
            assert torch.equal(got[k], want[k]), k
        assert [real_key(q)[0] for q in queries if q.has_image] == keys
        # in-memory images: nothing computed again; files: keyed by stat, processed only when not stored
        assert set(calls) - {"process"} == {q.id for q in files}, calls
        assert calls.count("process") == (0 if budget > 1 else len(files)), calls
        other = in_memory[0].image.copy()  # equal pixels, another object: never the staged entry
        assert cache.staged(other) is None and cache.staged(in_memory[0].image) is not None
        cache.unstage(staged)
        assert all(cache.staged(i) is None for i in staged)
    # images not to keep (noise copies) are only staged: the cache stays free for the run's own
    cache = PixelCache(2**30, policy="keep")
    staged = cache.stage_images(tiny, queries, keep=[])
    assert len(staged) == len(in_memory) and len(cache) == 0
