"""Every `mechprobe` command in README.md and docs/ runs as written, end to end, on a CPU (issue 16).

Each distinct command runs once, as a subprocess, in a sandbox laid out like a checkout
(``examples/`` and ``../shared`` where the text expects them), and must exit 0 and write its
report. Commands that need a real LLaVA-1.5 checkpoint, a GPU or the full official benchmarks
(``--device cuda``, ``examples/study.toml``, a hub model id, ``/data/...``) cannot run here;
they are listed, with the reason, and still parsed by tests/test_docs.py.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_docs import FILES, blocks, commands

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
NEEDS_GPU = ("--device cuda", "examples/study.toml", "llava-hf/", " /data/", ":/data/")


def doc_commands() -> tuple[list[str], list[str]]:
    runnable, skipped = [], []
    for path in FILES:
        for block in blocks(path, "bash"):
            for line in commands(block):
                words = shlex.split(line)
                if not words or words[0] != "mechprobe":
                    continue
                (skipped if any(mark in line for mark in NEEDS_GPU) else runnable).append(line)
    return list(dict.fromkeys(runnable)), list(dict.fromkeys(skipped))


def test_only_gpu_commands_are_skipped():
    runnable, skipped = doc_commands()
    assert len(runnable) >= 10, runnable
    assert all(any(m in c for m in NEEDS_GPU) for c in skipped)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    if not (SHARED / "llava-1.5-7b-hf").is_dir():
        pytest.skip("needs ../shared (the real processor and the benchmark copies)")
    root = tmp_path_factory.mktemp("checkout")
    repo = root / "repo"
    repo.mkdir()
    (repo / "examples").symlink_to(ROOT / "examples")
    (root / "shared").symlink_to(SHARED)
    return repo


@pytest.mark.parametrize("line", doc_commands()[0])
def test_documented_command_runs(line, sandbox):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    argv = shlex.split(line)[1:]
    done = subprocess.run([sys.executable, "-m", "experiments.cli", *argv], cwd=sandbox, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{line}\n--- stderr ---\n{done.stderr[-3000:]}"
    assert "wrote " in done.stdout, done.stdout[-2000:]
