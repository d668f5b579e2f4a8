"""Layers import only downward: hooks < probing < defenses < experiments, with no circles.

Every import statement of every module is read from its syntax tree, the ones inside functions
included (a lazy import is still a dependency), relative imports resolved. Each failure names the
importing file, its line and the rule it breaks.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("hooks", "probing", "defenses", "experiments")
RANK = {name: i for i, name in enumerate(LAYERS)}
# hooks depends on torch alone (transformer_lens only inside the bridge, lazily: an optional interop).
HOOKS_THIRD_PARTY = {"torch", "transformer_lens"}
# `python -m probing.cli` is a deprecated launcher that runs experiments.cli through runpy under
# `if __name__ == "__main__"`: it imports nothing of experiments and nothing imports it.
LAUNCHERS = {"probing.cli"}
STDLIB = {"__future__", "argparse", "ast", "collections", "contextlib", "copy", "csv", "dataclasses", "difflib",
          "enum", "functools", "hashlib", "importlib", "inspect", "io", "itertools", "json", "logging", "math",
          "os", "pathlib", "platform", "random", "re", "runpy", "shutil", "signal", "string", "subprocess", "sys",
          "tempfile", "threading", "time", "typing", "warnings", "weakref", "zlib", "base64", "html", "fcntl",
          "errno", "queue", "concurrent", "atexit", "textwrap", "struct", "uuid", "socket", "datetime", "statistics",
          "tomllib", "unicodedata", "numbers", "operator", "heapq", "bisect", "types", "traceback", "glob"}


def modules() -> dict[str, Path]:
    out = {}
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports(name: str, path: Path) -> list[tuple[str, int]]:
    """(absolute module imported, line) for every import statement in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.append((target, node.lineno))
            # "from pkg import submodule" depends on that submodule
            found += [(f"{target}.{a.name}", node.lineno) for a in node.names]
    return found


def project_edges():
    mods = modules()
    edges = {}
    for name, path in mods.items():
        targets = {}
        for target, line in imports(name, path):
            if target in mods and target != name:
                targets.setdefault(target, line)
        edges[name] = targets
    return mods, edges


def test_imports_only_go_downward():
    mods, edges = project_edges()
    bad = []
    for name, targets in edges.items():
        if name in LAUNCHERS:
            continue
        for target, line in targets.items():
            if RANK[target.split(".")[0]] > RANK[name.split(".")[0]]:
                bad.append(f"{mods[name].relative_to(ROOT)}:{line} imports {target} (upward: "
                           f"{' < '.join(LAYERS)})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_hooks_need_only_torch():
    mods = modules()
    bad = []
    for name, path in mods.items():
        if not name.startswith("hooks"):
            continue
        for target, line in imports(name, path):
            top = target.split(".")[0]
            if top not in STDLIB and top not in HOOKS_THIRD_PARTY and top != "hooks":
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "hooks/ must depend on torch only:\n" + "\n".join(bad)


def test_no_import_circles():
    mods, edges = project_edges()
    # A package's __init__ re-exports its submodules; the submodules' own imports decide circles.
    graph = {n: {t for t in ts if not n.startswith(t + ".")} for n, ts in edges.items()}
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_scorer_never_sees_defenses():
    _, edges = project_edges()
    for name in ("probing.scorer", "probing.plan", "probing.sweep"):
        assert not any(t.startswith("defenses") for t in edges[name]), name


def test_training_is_shared_not_borrowed():
    _, edges = project_edges()
    assert "probing.training" in edges["defenses.finetune"] and "probing.training" in edges["probing.toy.train"]
    assert not any(t.startswith("probing.toy.train") for t in edges["defenses.finetune"])
    assert not any(t.startswith("defenses") for t in edges["probing.toy.train"])
