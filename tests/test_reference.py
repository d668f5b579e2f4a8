"""The redesign's promise: results bit-identical to the pre-redesign code (tests/reference/).

The reference was written by tests/reference/make_reference.py on commit 638fccc. A mismatch
names the table, the query and both values, so a drift is located at once.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.reference.spec import FIGURES, run_reference

REF = Path(__file__).parent / "reference"


@pytest.fixture(scope="module")
def current(llava_assets):
    return run_reference()


def test_tables_bit_identical(current):
    tables, _ = current
    ref = load_file(str(REF / "reference.safetensors"))
    ids = json.loads((REF / "reference.json").read_text())["ids"]
    assert set(tables) == set(ids)
    for name, t in tables.items():
        assert t["ids"] == ids[name], f"{name}: query order changed"
        for what in ("margin", "lens_margin"):
            want, got = ref[f"{name}.{what}"], t[what]
            bad = (~torch.eq(want, got) & ~(want.isnan() & got.isnan())).nonzero()
            assert len(bad) == 0, (f"{name}.{what} differs from the reference at {len(bad)} entries; first: query "
                                   f"{t['ids'][bad[0][0]]!r}: reference {want[tuple(bad[0])].item()!r}, "
                                   f"now {got[tuple(bad[0])].item()!r}")


def test_effect_figures_identical(current):
    _, effects = current
    ref = json.loads((REF / "reference.json").read_text())["effects"]
    for name, figs in ref.items():
        for k in FIGURES:
            a, b = figs[k], effects[name][k]
            assert a == b or (math.isnan(a) and math.isnan(b)), f"{name}: figure {k} was {a!r}, now {b!r}"
