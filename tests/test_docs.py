"""Every code block of README.md and docs/ works as written (issue 16).

- ```python blocks run, in order, in one namespace per file (like a notebook), on the toy where
  the text says so (README.md's blocks are run by tests/test_readme.py, docs/extending.md's first
  block also by tests/test_extending.py);
- ```bash lines that call ``mechprobe`` are parsed by the real parser and their defense names,
  config files and dataset folders checked (running them all would take hours: the commands for a
  real LLaVA on a GPU cannot run here at all; `mechprobe demo` and a study run in other tests);
  ``python -m`` lines must name importable modules, ``python <script>`` existing files;
- ```toml blocks parse.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
import tomllib
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
FILES = [ROOT / "README.md", *DOCS]


def blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def commands(block: str) -> list[str]:
    """Shell lines with continuations joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    out = []
    for line in joined.splitlines():
        line = line.split(" #")[0].strip()
        if line and not line.startswith("#"):
            out += [part.strip() for part in line.split("&&")]
    return out


@pytest.mark.parametrize("path", [p for p in DOCS if blocks(p, "python")], ids=lambda p: p.name)
def test_python_blocks_run(path, tmp_path, monkeypatch):
    from defenses import REGISTRY

    monkeypatch.chdir(tmp_path)
    module = types.ModuleType(f"docs_{path.stem}")  # dataclasses look their module up in sys.modules
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = module.__dict__
    registered = set(REGISTRY)
    try:
        for i, code in enumerate(blocks(path, "python")):
            exec(compile(code, f"{path.name} python block {i + 1}", "exec"), namespace)
    finally:
        for name in set(REGISTRY) - registered:  # a doc's own registrations do not leak into other tests
            REGISTRY.pop(name)


def _check_mechprobe(argv: list[str], where: str) -> None:
    from defenses import check_names
    from experiments.cli import build_parser

    args = build_parser().parse_args(argv)
    for spec in (getattr(args, "defenses", None) or "", getattr(args, "ensembles", None) or ""):
        for name in filter(None, str(spec).split(",")):
            check_names(name)
    if getattr(args, "defense", None):
        check_names(args.defense)
    config = getattr(args, "config", None)
    if config:
        assert (ROOT / config).is_file(), f"{where}: config file {config} not in the repository"
    for spec in getattr(args, "dataset", None) or []:
        spec = spec if isinstance(spec, str) else str(spec)
        _, _, folder = spec.partition(":")
        if folder.startswith("../shared"):
            assert (ROOT / folder).exists() or not (ROOT.parent / "shared").exists(), f"{where}: {folder} missing"


@pytest.mark.parametrize("path", [p for p in FILES if blocks(p, "bash")], ids=lambda p: p.name)
def test_shell_commands_are_valid(path):
    checked = 0
    for block in blocks(path, "bash"):
        for line in commands(block):
            words = shlex.split(line)
            while words and "=" in words[0] and not words[0].startswith("-"):  # VAR=value prefixes
                words = words[1:]
            if not words:
                continue
            where = f"{path.name}: {line}"
            if words[0] == "mechprobe":
                _check_mechprobe(words[1:], where)
                checked += 1
            elif words[0].startswith("python") and len(words) > 2 and words[1] == "-m":
                module = words[2]
                if module not in ("pytest", "pip"):
                    assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"
                checked += 1
            elif words[0].startswith("python") and len(words) > 1 and words[1].endswith(".py"):
                assert (ROOT / words[1]).is_file(), f"{where}: no file {words[1]}"
                checked += 1
            elif words[0] in ("accelerate", "torchrun"):
                module = words[words.index("-m") + 1] if "-m" in words else None
                assert module is None or importlib.util.find_spec(module) is not None, where
                checked += 1
    assert checked or path.name in ("README.md",), f"{path.name}: no command checked"


@pytest.mark.parametrize("path", [p for p in FILES if blocks(p, "toml")], ids=lambda p: p.name)
def test_toml_blocks_parse(path):
    for block in blocks(path, "toml"):
        tomllib.loads(block)


TOY_WEIGHTS = ROOT / "probing" / "toy" / "weights" / "model.safetensors"
#: how a doc says which toy weights its recorded numbers came from
TOY_FINGERPRINT = re.compile(r"toy weights `model\.safetensors` sha256\s+`([0-9a-f]{12,64})`")


def test_recorded_toy_numbers_name_the_shipped_weights():
    """A doc that records numbers measured on the toy names the weights' sha256 (a prefix); the toy
    is retrained now and then, and numbers recorded before that are stale: this fails until the
    doc's numbers are re-run and its fingerprint updated."""
    import hashlib

    shipped = hashlib.sha256(TOY_WEIGHTS.read_bytes()).hexdigest()
    found = {path.name: TOY_FINGERPRINT.findall(path.read_text()) for path in FILES}
    assert found["analysis.md"], "docs/analysis.md records the '+' prediction benchmark's toy weights"
    stale = [(name, h) for name, hs in found.items() for h in hs if not shipped.startswith(h)]
    assert not stale, f"numbers recorded on other toy weights than the shipped {shipped[:12]}: {stale}"
