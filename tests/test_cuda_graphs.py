"""`probing.cuda_graphs`: when a module may be replayed from a CUDA graph (`graph_obstacle`), and
`ShapeGraphs`' bookkeeping (one graph per shape, recorded again when the weights move, eager past
its limit or after a failed capture, outputs copied out of the graph's memory).

Recording and replaying need a GPU: here a stand-in graph replays the recorded call. On a GPU,
benchmarks/gpu_study.py --decode-check compares replays with eager calls."""

import logging

import pytest
import torch

import probing.cuda_graphs as cg
import probing.pipeline as pipeline
from probing.cuda_graphs import ShapeGraphs, graph_obstacle


def test_graph_obstacles_are_named(tiny, mixed_queries):
    """Hooks and compiled modules are named before the device: a hook's Python would run only at
    capture. transformers' output-capturing hooks (installed by a first forward) do not count."""
    from probing import RefusalScorer

    RefusalScorer(tiny, progress=False).score(mixed_queries[:2])
    assert any(m._forward_hooks for m in tiny.model.modules()), "transformers installed no hooks"
    assert "cpu" in graph_obstacle(tiny.model)
    handle = tiny.layers[1].register_forward_hook(lambda *a: None)
    try:
        reason = graph_obstacle(tiny.model)
        assert "layers.1" in reason and "hooks" in reason
        # the vision modules alone have no hook: only the device stands in the way
        assert "cpu" in graph_obstacle([tiny.model.model.vision_tower, tiny.model.model.multi_modal_projector])
    finally:
        handle.remove()
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda *a: None)
    try:
        assert "global" in graph_obstacle(tiny.model)
    finally:
        handle.remove()
    lm = tiny.language_model
    lm.compile()  # lazy: nothing compiles until it is called
    try:
        assert "compiled" in graph_obstacle(tiny.model)
    finally:
        lm._compiled_call_impl = None
    assert "cpu" in graph_obstacle(tiny.model)


def test_the_environment_turns_graphs_off(tiny, monkeypatch):
    monkeypatch.setenv(cg.ENV, "0")
    assert graph_obstacle(tiny.model) == f"{cg.ENV}=0"
    monkeypatch.setenv(cg.ENV, "1")
    assert cg.graphs_allowed()


class FakeGraph:
    """Replays the recorded call into the tensors it returned, as a CUDA graph rewrites them."""

    def __init__(self, fn, out):
        self.fn, self.out = fn, out

    def replay(self):
        self.out.copy_(self.fn())


@pytest.fixture
def fake_cuda(monkeypatch):
    recorded = []

    def record(fn, pool=None):
        out = fn()
        recorded.append(out.shape)
        return FakeGraph(fn, out), out

    monkeypatch.setattr(cg, "warm_up", lambda fn, device: fn())
    monkeypatch.setattr(cg, "record", record)
    monkeypatch.setattr(cg.torch.cuda, "graph_pool_handle", lambda: "pool")
    return recorded


def test_shape_graphs_record_once_per_shape_and_copy_outputs_out(fake_cuda):
    weight = torch.tensor(2.0)
    where = {"key": 1}
    graphs = ShapeGraphs(lambda x: x * weight, lambda: where["key"], max_graphs=2)
    a, b = torch.arange(3.0), torch.arange(4.0)
    first = graphs(a)
    assert torch.equal(first, a * 2) and fake_cuda == [torch.Size([3])]
    second = graphs(a + 1)  # replayed: same shape, new values
    assert torch.equal(second, (a + 1) * 2) and len(fake_cuda) == 1
    assert torch.equal(first, a * 2), "an earlier result was rewritten by a later replay"
    assert torch.equal(graphs(b), b * 2) and len(fake_cuda) == 2
    assert torch.equal(graphs(torch.ones(5)), torch.ones(5) * 2)  # past max_graphs: eager
    assert len(fake_cuda) == 2 and len(graphs) == 2 and graphs.eager_calls == 1 and graphs.replays == 3
    where["key"] = 2  # the weights moved: recorded again
    weight.fill_(3.0)
    assert torch.equal(graphs(a), a * 3) and len(fake_cuda) == 3


def test_a_failed_capture_runs_eagerly_and_is_not_tried_again(fake_cuda, monkeypatch, caplog):
    calls = []

    def refuse(fn, pool=None):
        calls.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cg, "record", refuse)
    graphs = ShapeGraphs(lambda x: x + 1, lambda: 0, name="test tower")
    with caplog.at_level(logging.WARNING, logger="probing.cuda_graphs"):
        for _ in range(3):
            assert torch.equal(graphs(torch.zeros(2)), torch.ones(2))
    assert len(calls) == 1 and graphs.eager_calls == 3
    assert "test tower" in caplog.text and "not permitted" in caplog.text


def test_image_features_are_eager_on_the_cpu(tiny, mixed_queries, monkeypatch):
    """The graphs are for CUDA tensors only; on the CPU the features are the trunk's own."""
    monkeypatch.setattr(pipeline, "_vision_graphs", lambda model: pytest.fail("graphs asked for on the CPU"))
    image = next(q for q in mixed_queries if q.has_image)
    pixels = pipeline.process_image(tiny, image.load_image())[None]
    with torch.inference_mode():
        feats = pipeline.image_features(tiny.model, pixels)
        want = tiny.model.model.get_image_features(pixel_values=pixels).pooler_output
    assert len(feats) == 1 and torch.equal(feats[0], want[0])
