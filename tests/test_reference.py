"""The redesign's promise: results bit-identical to the pre-redesign code (tests/reference/).

The reference was written by tests/reference/make_reference.py running the pre-redesign code
(commit 2c66e6a with the current toy copied in). Float kernels differ between CPU families (MKL
and oneDNN pick other code paths, so margins move by ~1e-6), so the pre-redesign code's output is
kept once per machine class it was run on (``reference*.safetensors`` + ``.json``: the original
one, and ``reference-amd-epyc-avx512``). The current code must equal one of them bit for bit:
on any machine, the one its pre-redesign run made. A mismatch names, for every stored reference,
the table, the query and both values, so a drift is located at once (and a new machine class is
told apart from a real drift: its differences are ~1e-6 everywhere; add its reference with
make_reference.py, as its docstring says).
"""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.reference.spec import FIGURES, run_reference

REF = Path(__file__).parent / "reference"
REFERENCES = sorted(REF.glob("reference*.safetensors"))


@pytest.fixture(scope="module")
def current(llava_assets):
    return run_reference()


def table_mismatches(tables, tensors, ids) -> list[str]:
    out = []
    if set(tables) != set(ids):
        return [f"tables {sorted(tables)} against {sorted(ids)}"]
    for name, t in tables.items():
        if t["ids"] != ids[name]:
            out.append(f"{name}: query order changed")
            continue
        for what in ("margin", "lens_margin"):
            want, got = tensors[f"{name}.{what}"], t[what]
            bad = (~torch.eq(want, got) & ~(want.isnan() & got.isnan())).nonzero()
            if len(bad):
                out.append(f"{name}.{what} differs at {len(bad)} entries (largest {float((want - got).abs().nan_to_num().max()):.2e}); "
                           f"first: query {t['ids'][bad[0][0]]!r}: reference {want[tuple(bad[0])].item()!r}, "
                           f"now {got[tuple(bad[0])].item()!r}")
    return out


def effect_mismatches(effects, ref_effects) -> list[str]:
    return [f"{name}: figure {k} was {figs[k]!r}, now {effects[name][k]!r}"
            for name, figs in ref_effects.items() for k in FIGURES
            if not (figs[k] == effects[name][k] or (math.isnan(figs[k]) and math.isnan(effects[name][k])))]


def check_one_reference_matches(found: dict[str, list[str]]) -> None:
    if not any(not m for m in found.values()):
        pytest.fail("no stored reference matches bit for bit:\n" + "\n".join(
            f"  {ref}: {len(m)} mismatches; {m[0]}" for ref, m in found.items()))


def test_tables_bit_identical(current):
    tables, _ = current
    assert REFERENCES, "no reference*.safetensors in tests/reference"
    check_one_reference_matches({
        path.name: table_mismatches(tables, load_file(str(path)), json.loads(path.with_suffix(".json").read_text())["ids"])
        for path in REFERENCES})


def test_effect_figures_identical(current):
    _, effects = current
    check_one_reference_matches({
        path.name: effect_mismatches(effects, json.loads(path.with_suffix(".json").read_text())["effects"])
        for path in REFERENCES})


def test_a_one_ulp_drift_matches_no_reference(current):
    """The check itself: the current tables moved by one float step in one entry match no stored
    reference, and every reference reports that entry."""
    tables, _ = current
    moved = {n: dict(t) for n, t in tables.items()}
    m = moved["toy/baseline"]["margin"].clone()
    m[3] = torch.nextafter(m[3], torch.tensor(math.inf))
    moved["toy/baseline"]["margin"] = m
    for path in REFERENCES:
        found = table_mismatches(moved, load_file(str(path)), json.loads(path.with_suffix(".json").read_text())["ids"])
        assert any(f.startswith("toy/baseline.margin") for f in found), path.name
