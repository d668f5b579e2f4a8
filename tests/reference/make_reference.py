"""Writes the reference results that the redesign (issue 10) must reproduce bit for bit.

    python tests/reference/make_reference.py [--name reference-<machine class>]

Run on the pre-redesign code (commit 2c66e6a, which holds this script) with the current toy
weights and toy dataset copied in (probing/toy/weights/, probing/datasets/toy.py): the reference
then pins the machinery, not a particular toy. tests/test_reference.py recomputes the same
conditions with the current code and asserts equality. Last regenerated after the toy's third
training stage (issue 14, 2026-11-26 evening): git worktree add /tmp/ref 2c66e6a, copy those files in, run this script there with
MECHPROBE_LLAVA_DIR set, copy reference.* back. Float kernels differ between CPU families, so
each machine class gets its own pre-redesign output (``--name``): on 2026-11-27 the shared 2-core
machines were AMD EPYC with AVX-512, where margins differed from reference.* by up to 7e-6, and
`reference-amd-epyc-avx512.*` was made there the same way (the current spec.py copied in too; the
current code then equalled it bit for bit). tests/test_reference.py passes when one of them matches. Covers a toy run (test split: baseline,
a system-prompt defense, captioning, an activation edit) and a tiny-random run (text and image
queries, baseline and a system-prompt defense), with every output-level figure of `compare`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from safetensors.torch import save_file  # noqa: E402

from tests.reference.spec import FIGURES, run_reference  # noqa: E402


def main() -> None:
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--name", default="reference", help="file stem: reference-<machine class> for another CPU family")
    stem = p.parse_args().name
    tables, effects = run_reference()
    tensors = {}
    for name, t in tables.items():
        tensors[f"{name}.margin"] = t["margin"].contiguous()
        tensors[f"{name}.lens_margin"] = t["lens_margin"].contiguous()
    save_file(tensors, str(HERE / f"{stem}.safetensors"))
    ids = {name: t["ids"] for name, t in tables.items()}
    (HERE / f"{stem}.json").write_text(json.dumps({"ids": ids, "effects": effects, "figures": FIGURES}, indent=1))
    print(f"wrote {HERE}/{stem}.safetensors and {stem}.json ({len(tables)} tables)")


if __name__ == "__main__":
    main()
