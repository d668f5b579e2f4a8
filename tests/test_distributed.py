"""Data-parallel scoring (two gloo CPU processes) and device-map placement."""

import json
import os
import subprocess
import sys

import pytest
import torch

from hooks import capture, hook_name
from probing import RefusalScorer, ScoreTable, load_model
from probing.datasets import save_jsonl
from probing.model import find_llava_assets

from .conftest import noise_image


def _queries_file(tmp_path, n=7):
    from probing import Query

    paths = []
    for i in range(3):
        p = tmp_path / f"img{i}.png"
        noise_image(i).save(p)
        paths.append(p)
    qs = [Query(f"q{i}", f"question {i} " + "word " * i, image=paths[i % 3] if i % 2 else None,
                label="harmful" if i % 2 else "benign") for i in range(n)]
    return save_jsonl(qs, tmp_path / "q.jsonl")


def test_two_process_run_equals_single_process(tmp_path, llava_assets):
    qfile = _queries_file(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MECHPROBE_LLAVA_DIR": str(find_llava_assets()),
           "OMP_NUM_THREADS": "1"}
    common = ["-m", "experiments.cli", "score", "--queries", str(qfile), "--batch-size", "2"]
    multi = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         *common, "--out", str(tmp_path / "multi")],
        env=env, capture_output=True, text=True, timeout=300)
    assert multi.returncode == 0, multi.stderr[-3000:]
    single = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "single")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = ScoreTable.load(tmp_path / "multi"), ScoreTable.load(tmp_path / "single")
    assert a.ids == b.ids == [f"q{i}" for i in range(7)] and a.labels == b.labels
    assert a.meta["processes"] == 2
    torch.testing.assert_close(a.margin, b.margin, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.lens_margin, b.lens_margin, atol=1e-5, rtol=0)
    assert not (tmp_path / "multi" / ".shards").exists()


def test_device_map_placement_matches_plain_run(tiny, mixed_queries):
    n = tiny.n_layers
    device_map = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu",
                  "model.language_model.embed_tokens": "cpu", "model.language_model.norm": "cpu",
                  "model.language_model.rotary_emb": "cpu", "lm_head": "cpu",
                  **{f"model.language_model.layers.{i}": "cpu" for i in range(n)}}
    placed = load_model("tiny-random", device_map=device_map)
    assert getattr(placed.model, "hf_device_map", None) == device_map
    a = RefusalScorer(placed, keep_hidden=True).score(mixed_queries)
    b = RefusalScorer(tiny, keep_hidden=True).score(mixed_queries)
    torch.testing.assert_close(a.margin, b.margin, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.hidden, b.hidden, atol=1e-5, rtol=0)
    # accelerate's own module hooks and ours coexist and ours are removed
    before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in placed.model.modules())
    with capture(placed, [hook_name(0)]):
        pass
    after = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in placed.model.modules())
    assert before == after
