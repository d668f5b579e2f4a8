"""Runs the activation-level defense example of docs/extending.md exactly as written."""

import re
from pathlib import Path

import pytest
import torch

from defenses import REGISTRY, get_defense
from probing import Query, RefusalScorer
from probing.errors import InputError

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def example_code() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    return blocks[0]


def test_example_is_short_and_runs(tiny):
    code = example_code()
    assert len([l for l in code.splitlines() if l.strip()]) < 30
    REGISTRY.pop("act_clamp", None)
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    exec(compile(code, str(DOC), "exec"), {})  # re-running the cell (a notebook) registers again quietly
    try:
        qs = [Query(f"q{i}", f"request {i} " + "y " * i, label="harmful" if i % 2 else "benign") for i in range(6)]
        baseline = RefusalScorer(tiny, keep_hidden=True).score(qs)
        plain = RefusalScorer(tiny, layers=None).score(qs)
        clamped = RefusalScorer(tiny, layers=None).score(qs, defense=get_defense("act_clamp", baseline=baseline,
                                                                                  floor=5.0))
        assert clamped.meta["defense"] == "act_clamp" and clamped.meta["params"]["floor"] == 5.0
        assert (clamped.margin - plain.margin).abs().max() > 1e-3
        # a floor far below every projection changes nothing
        low = RefusalScorer(tiny, layers=None).score(qs, defense=get_defense("act_clamp", baseline=baseline,
                                                                              floor=-1e6))
        torch.testing.assert_close(low.margin, plain.margin, atol=1e-6, rtol=0)
        both = RefusalScorer(tiny, layers=None).score(qs, defense=get_defense("sr_self_reminder+act_clamp",
                                                                               baseline=baseline))
        assert both.meta["defense"] == "sr_self_reminder+act_clamp"
        for bad, match in (({"floor": float("nan")}, "'floor'"), ({"layers": (99,)}, r"'layers'.*available")):
            with pytest.raises(InputError, match=match):
                get_defense("act_clamp", baseline=baseline, **bad)
    finally:
        REGISTRY.pop("act_clamp", None)


def test_example_clamps_at_the_hook_point_its_directions_come_from(tiny):
    """The recipe's directions are decision states at blocks.{l}.hook_resid_post: its clamp acts
    there, raising exactly the projections below the floor to it and leaving the others."""
    from hooks import capture, edit, hook_name
    from probing.render import encode

    REGISTRY.pop("act_clamp", None)
    exec(compile(example_code(), str(DOC), "exec"), {})
    try:
        qs = [Query(f"q{i}", f"request {i} " + "y " * i, label="harmful" if i % 2 else "benign") for i in range(6)]
        scorer = RefusalScorer(tiny, keep_hidden=True)
        baseline = scorer.score(qs)
        d = get_defense("act_clamp", baseline=baseline, floor=0.0)
        u = d.units[1].float()
        inputs = encode(tiny, scorer.render(qs), [None] * len(qs))
        real = inputs["attention_mask"].bool()
        with capture(tiny, [hook_name(1)], "all") as plain, torch.no_grad():
            tiny.model(**inputs)
        floor = float((plain[hook_name(1)] @ u)[real].median())  # half the positions lie below it
        d = get_defense("act_clamp", baseline=baseline, floor=floor)
        with edit(tiny, d.edits(tiny)), capture(tiny, [hook_name(1)], "all") as clamped, torch.no_grad():
            tiny.model(**inputs)
        before = (plain[hook_name(1)] @ u)[real]
        torch.testing.assert_close((clamped[hook_name(1)] @ u)[real], before.clamp(min=floor), atol=1e-4, rtol=0)
    finally:
        REGISTRY.pop("act_clamp", None)
