"""The study's plan-ahead worker and up-front generation (issue 15: a busy device).

The worker builds chunk k+1's plans while chunk k is scored; it must give the same tables as
building every plan in the main thread, never enter the model, and fall back to the main thread
when a plan needs generation. Captions are generated for the whole run before the chunks, in
batches fitted to the device."""

import functools
import threading
from types import SimpleNamespace

import pytest
import torch

import defenses.rewriting as rewriting
import experiments.study as study_mod
import probing.prefix as prefix_mod
import probing.scorer as scorer_mod
from experiments.plan_ahead import PlanAhead
from experiments.study import Study
from experiments.study_config import StudyConfig
from probing import Query
from probing.errors import GenerationNeeded, InputError
from probing.generation import (DEFAULT_GENERATION_BATCH, MAX_GENERATION_BATCH, fit_generation_batch, generate,
                                generation_batch, generation_forbidden)

DEFENSES = ["sr_self_reminder", "sr_mmsafety", "qr_caption", "ni_image_gaussian", "ni_text_smooth"]
ENSEMBLES = ["sr_mmsafety+ni_image_gaussian", "qr_caption|sr_self_reminder"]


def _config(out, **extra) -> StudyConfig:
    return StudyConfig(model="tiny-random", out=str(out), defenses=list(DEFENSES), ensembles=list(ENSEMBLES),
                       datasets=[{"name": "toy", "tag": "toy", "limit": 10}], batch_size=3, generation_check=0,
                       max_new_tokens=4, **extra)


def _run(out, monkeypatch, enabled: bool):
    """A study's query-major pass, recording which threads built plans and called `generate`."""
    threads = {"plans": [], "generate": [], "encoded": []}
    real_plans, real_score = Study._plans, Study._score_query_major
    scoring = threading.Event()

    def plans(self, names, chunk):
        threads["plans"].append(threading.current_thread().name)
        return real_plans(self, names, chunk)

    def score_query_major(self, *a, **k):
        scoring.set()
        try:
            return real_score(self, *a, **k)
        finally:
            scoring.clear()

    def encoding(real):
        def encode_batch(*a, **k):
            # which thread encodes a batch, and whether a chunk is being scored meanwhile
            threads["encoded"].append((threading.current_thread().name, scoring.is_set()))
            return real(*a, **k)
        return encode_batch

    for mod in (prefix_mod, scorer_mod):
        monkeypatch.setattr(mod, "encode_batch", encoding(mod.encode_batch))
    monkeypatch.setattr(Study, "_score_query_major", score_query_major)

    def counting_generate(bundle, queries, *a, **k):
        threads["generate"].append((threading.current_thread().name, len(queries)))
        return generate(bundle, queries, *a, **k)

    monkeypatch.setattr(Study, "_plans", plans)
    monkeypatch.setattr(rewriting, "generate", counting_generate)
    monkeypatch.setattr(study_mod, "PlanAhead", functools.partial(PlanAhead, enabled=enabled))
    study = Study(_config(out))
    try:
        study.score_shared_prefixes()
        for name in study.conditions:
            study.table(name)
        return study, threads
    finally:
        study.run.close()
        monkeypatch.undo()


def test_plans_built_ahead_give_the_same_tables_and_never_run_the_model_off_the_main_thread(llava_assets, tmp_path,
                                                                                           monkeypatch):
    ahead, seen = _run(tmp_path / "ahead", monkeypatch, enabled=True)
    inline, seen_inline = _run(tmp_path / "inline", monkeypatch, enabled=False)
    main = threading.main_thread().name
    n_chunks = len(ahead.run.shard_chunks(ahead.queries, 3))
    assert n_chunks >= 3
    # every chunk after the first was built by the worker; the first in the main thread
    assert seen["plans"][0] == main and seen["plans"][1:] and \
        all(t.startswith("mechprobe-plan") for t in seen["plans"][1:]), seen["plans"]
    assert len(seen["plans"]) == n_chunks and ahead.timings["plan_fallbacks"] == 0
    assert all(t == main for t in seen_inline["plans"])
    # the worker also encoded each chunk's first batches: while a chunk is scored the main thread
    # encodes nothing (later batches come from the prefetch workers); it encodes only the first
    # chunk's first batches, before it is scored. Without the worker it encodes every chunk's.
    assert (main, True) not in seen["encoded"], seen["encoded"]
    assert {t for t, _ in seen["encoded"]} == {main, "mechprobe-plan_0", "mechprobe-prefetch[query-major]"}
    mains = [t for t, _ in seen["encoded"]].count(main)
    assert 0 < mains < [t for t, _ in seen_inline["encoded"]].count(main)
    # captions: generated once, up front, in the main thread, all in one batch (16 >= 10 queries)
    n_images = sum(q.has_image for q in ahead.queries)
    assert n_images and seen["generate"] == [(main, n_images)], seen["generate"]
    assert ahead.timings["generation_s"] > 0
    for name in ahead.conditions:
        a, b = ahead.tables[name], inline.tables[name]
        assert a.ids == b.ids, name
        torch.testing.assert_close(a.margin, b.margin, atol=0, rtol=0, msg=lambda m: f"{name}: {m}")


def test_a_plan_that_needs_generation_is_built_again_in_the_main_thread():
    calls = []

    def build(names, chunk):
        calls.append(threading.current_thread().name)
        if len(calls) == 1:  # the worker's try: a rewrite the cache lacks
            generate(None, [Query("q1", "text")])
        return {"built": chunk}

    with PlanAhead(build) as planner:
        planner.submit(1, ["a"], ["c1"])
        assert planner.take(1, ["a"], ["c1"]) == {"built": ["c1"]}
        assert planner.fallbacks == 1
    assert calls[0].startswith("mechprobe-plan") and calls[1] == threading.main_thread().name


def test_a_build_for_another_chunk_or_names_is_dropped_and_errors_reach_the_caller():
    built = []

    def build(names, chunk):
        built.append((tuple(names), chunk))
        if chunk == ["bad"]:
            raise InputError("query 'x': unreadable image")
        return chunk

    with PlanAhead(build) as planner:
        planner.submit(2, ["a", "b"], ["two"])
        assert planner.take(2, ["a"], ["two"]) == ["two"]  # other names: built here again
        # the worker's build was cancelled before it started, or finished and was dropped
        assert built[-1] == (("a",), ["two"]) and built[:-1] in ([], [(("a", "b"), ["two"])]), built
        planner.submit(3, ["a"], ["bad"])
        with pytest.raises(InputError, match="unreadable image"):
            planner.take(3, ["a"], ["bad"])
    assert planner._pool is None
    assert not [t for t in threading.enumerate() if t.name.startswith("mechprobe-plan")]


def test_generation_forbidden_names_why_and_is_local_to_its_thread():
    with generation_forbidden("the worker builds plans"):
        with pytest.raises(GenerationNeeded, match=r"'q1'.*the worker builds plans"):
            generate(None, [Query("q1", "text")])
        errors = []

        def other_thread():  # no guard here: generate goes on and fails on the missing model instead
            try:
                generate(None, [Query("q1", "text")])
            except Exception as exc:  # noqa: BLE001
                errors.append(type(exc))

        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
    assert errors == [AttributeError]
    with pytest.raises(InputError, match="generation batch size"):
        with generation_batch(0):
            pass


def _fake_bundle(device: str, layers=32, heads=32, d=4096, dtype=torch.bfloat16):
    text = SimpleNamespace(num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                           hidden_size=d, head_dim=d // heads)
    return SimpleNamespace(input_device=torch.device(device), dtype=dtype,
                           model=SimpleNamespace(config=SimpleNamespace(text_config=text)))


def test_generation_batch_fits_free_memory_and_evens_out_batches(monkeypatch):
    assert fit_generation_batch(_fake_bundle("cpu"), 600, 24, 500) == DEFAULT_GENERATION_BATCH
    per_seq = 2 * 2 * 32 * (600 + 24) * 4096 * 2  # K and V, every layer, bf16: 0.33 GB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(60.5 * per_seq), 80 * 2**30))
    # half of the free memory holds 30 sequences: 100 queries run as 4 batches of 25, not 30+30+30+10
    assert fit_generation_batch(_fake_bundle("cuda"), 600, 24, 100) == 25
    assert fit_generation_batch(_fake_bundle("cuda"), 600, 24, 7) == 7
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10**15, 10**15))
    assert fit_generation_batch(_fake_bundle("cuda"), 600, 24, 1000) == 125  # 8 batches at most 128
    assert fit_generation_batch(_fake_bundle("cuda"), 600, 24, 1000) <= MAX_GENERATION_BATCH
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1, 10**15))
    assert fit_generation_batch(_fake_bundle("cuda"), 600, 24, 9) == 1  # nothing free: one at a time


def test_generations_made_before_an_interruption_are_kept(llava_assets, tmp_path, monkeypatch):
    """Up-front generation stores each batch as it finishes: a study interrupted in its second
    batch keeps the first one's captions, and the resumed study generates only the rest."""
    monkeypatch.setattr(study_mod, "fit_generation_batch", lambda *a, **k: 2)
    calls = []

    def counting(bundle, queries, *a, fail_at=None, **k):
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt
        calls.append([q.id for q in queries])
        return generate(bundle, queries, *a, **k)

    monkeypatch.setattr(rewriting, "generate", functools.partial(counting, fail_at=1))
    study = Study(_config(tmp_path / "run"))
    with pytest.raises(KeyboardInterrupt):
        study.score_shared_prefixes()
    study.run.close()
    assert len(calls) == 1 and len(calls[0]) == 2
    first = calls[0]
    calls.clear()
    monkeypatch.setattr(rewriting, "generate", counting)
    resumed = Study(_config(tmp_path / "run"))
    try:
        resumed.score_shared_prefixes()
        asked = [i for c in calls for i in c]
        n_images = sum(q.has_image for q in resumed.queries)
        assert not set(first) & set(asked) and len(asked) == n_images - 2, (first, calls)
    finally:
        resumed.run.close()


@pytest.mark.parametrize("ahead", [True, False])
def test_the_next_generation_batch_has_its_images_ready(llava_assets, tmp_path, monkeypatch, ahead):
    """Up-front generation in several batches: each batch's images are processed before its
    `generate` call (on an accelerator, the next batch's while this one generates: ``ahead``),
    so `generate` itself processes none, and the captions are those of generating without it.
    Nothing stays staged."""
    import probing.pipeline as pipeline

    monkeypatch.setattr(study_mod, "images_ahead", lambda bundle: ahead)
    monkeypatch.setattr(study_mod, "fit_generation_batch", lambda *a, **k: 2)
    inside, processed_inside, calls = threading.Event(), [], []
    real_process, real_generate = pipeline.process_image, rewriting.generate

    def process(*a, **k):
        name = threading.current_thread().name  # generate's own: the main thread or its pixel threads
        if inside.is_set() and (name == "MainThread" or name.startswith("mechprobe-generation-pixels")):
            processed_inside.append(len(calls))
        return real_process(*a, **k)

    def generating(bundle, queries, *a, **k):
        calls.append([q.id for q in queries])
        inside.set()
        try:
            return real_generate(bundle, queries, *a, **k)
        finally:
            inside.clear()

    monkeypatch.setattr(pipeline, "process_image", process)
    monkeypatch.setattr(rewriting, "generate", generating)
    built_by = []
    real_stage = pipeline.PixelCache.stage_images
    monkeypatch.setattr(pipeline.PixelCache, "stage_images", lambda self, *a, **k: built_by.append(
        threading.current_thread().name) or real_stage(self, *a, **k))
    study = Study(_config(tmp_path / "run"))
    try:
        study.prepare_generations(["qr_caption"])
        assert len(calls) >= 3 and processed_inside == [], processed_inside
        # the first batch in the main thread; the others in the worker when ahead
        assert built_by[0] == "MainThread" and all(n.startswith("mechprobe-plan") == ahead for n in built_by[1:])
        assert not study.scorer.pixel_cache._staged
        qr = study.defense("qr_caption")
        images = [q for q in study.queries if q.has_image]
        assert qr.todo(images, study.bundle) == []
        got = [v[0][0].text for v in qr.transform(images, study.bundle)]
        monkeypatch.setattr(pipeline, "process_image", real_process)
        want = [v[0][0].text for start in range(0, len(images), 2)
                for v in qr.inner.transform(images[start:start + 2], study.bundle)]  # no cache, no staging
        assert got == want
    finally:
        study.run.close()


def test_generation_pixels_are_the_processors_and_go_to_the_pixel_cache(tiny, mixed_queries):
    """`generate` processes a batch's images in threads, from `generation_batch`'s pixel cache when
    one is given: the same answers as the processor's own call on the same prompts and images,
    and the cache then holds the images (the study's scoring finds them there)."""
    from probing import PromptSpec
    from probing.pipeline import PixelCache
    from probing.render import render_prompt

    qs = [q for q in mixed_queries if q.has_image][:3] + [q for q in mixed_queries if not q.has_image][:1]
    prompts = [render_prompt(tiny.processor, q, PromptSpec()) for q in qs]
    ref = tiny.processor(text=prompts, images=[q.load_image() for q in qs if q.has_image], padding=True,
                         return_tensors="pt")
    ref["pixel_values"] = ref["pixel_values"].to(tiny.dtype)
    with torch.inference_mode():
        ids = tiny.model.generate(**ref, max_new_tokens=4, do_sample=False, pad_token_id=tiny.tokenizer.pad_token_id)
    want = [t.strip() for t in tiny.tokenizer.batch_decode(ids[:, ref["input_ids"].shape[1]:], skip_special_tokens=True)]
    assert generate(tiny, qs, 4, batch_size=4) == want
    cache = PixelCache(2**30, policy="keep")
    with generation_batch(4, pixel_cache=cache):
        assert generate(tiny, qs, 4) == want
    assert cache.misses == 3 and len(cache) == 3
    with generation_batch(4, pixel_cache=cache):
        assert generate(tiny, qs, 4) == want
    assert cache.hits == 3 and cache.misses == 3


def test_the_shard_writer_runs_in_order_waits_on_exit_and_raises_store_errors(caplog):
    """`ShardWriter`: stores run in submission order off the main thread; leaving the block waits
    for all of them, also when it ends by Ctrl-C (nothing is lost); a store's error reaches the
    main thread at `flush`, or is logged when the block is already ending by another exception."""
    import time

    from experiments.shard_writer import ShardWriter

    done, threads = [], set()

    def store(i, delay=0.0):
        time.sleep(delay)
        threads.add(threading.current_thread().name)
        done.append(i)

    with pytest.raises(KeyboardInterrupt):
        with ShardWriter() as writer:
            writer.submit(lambda: store(0, 0.05))
            writer.submit(lambda: store(1))
            raise KeyboardInterrupt
    assert done == [0, 1] and threads == {n for n in threads if n.startswith("mechprobe-shards")}
    assert not [t for t in threading.enumerate() if t.name.startswith("mechprobe-shards")]

    def broken():
        raise OSError("disk full")

    with ShardWriter() as writer:
        writer.submit(broken)
        with pytest.raises(OSError, match="disk full"):
            writer.flush()
        writer.submit(lambda: store(2))
    assert done[-1] == 2
    with pytest.raises(ValueError, match="the real error"):
        with ShardWriter() as writer:
            writer.submit(broken)
            raise ValueError("the real error")
    assert "a shard store failed" in caplog.text
