"""Run directories that survive interruption.

    runs/<name>/config.json                         everything needed to rerun, with package versions
    runs/<name>/shards/<condition>/<k>/             one ScoreTable per batch of queries
    runs/<name>/tables/*.csv|json, report.md, *.png written by the experiment

Re-running with the same config resumes: finished shards are loaded, not recomputed; an
interrupted run loses at most the batch in flight; a truncated or corrupt shard (unreadable, or
holding other query ids) is detected, logged and recomputed. A different config in the same
directory is refused (use another --out, or --overwrite).
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

from probing.query import Query
from probing.score_table import ScoreTable

from probing.errors import RunDirError

from .report import write_table

logger = logging.getLogger(__name__)
_PACKAGES = ("mechprobe", "torch", "transformers", "transformer-lens", "numpy", "scipy", "scikit-learn", "pillow")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


class RunDir:
    """A run directory bound to one config (a JSON-able dict)."""

    def __init__(self, path, config: dict, *, overwrite: bool = False, ignore=()):
        """``ignore``: config keys that do not identify the run (analysis options); they may change
        between a run and its resumption."""
        self.path = Path(path)
        self.config = json.loads(json.dumps(config, default=str))
        cfg_file = self.path / "config.json"
        if overwrite and self.path.exists():
            shutil.rmtree(self.path)
        if cfg_file.is_file():
            old = json.loads(cfg_file.read_text()).get("config") or {}
            keys = sorted(k for k in set(old) | set(self.config) if k not in ignore and old.get(k) != self.config.get(k))
            if keys:
                raise RunDirError(f"{self.path} holds a run with another config; use another --out or --overwrite "
                                  f"(differs in: {keys})")
            logger.info("resuming run in %s", self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        cfg_file.write_text(json.dumps({"config": self.config, "versions": package_versions()}, indent=1))

    def score(self, score_fn: Callable[[list[Query]], ScoreTable], queries: Sequence[Query], condition: str,
              batch: int) -> ScoreTable:
        """Score ``queries`` under ``condition`` shard by shard (``batch`` queries each), resuming."""
        queries = list(queries)
        root = self.path / "shards" / condition
        parts = []
        for k, start in enumerate(range(0, len(queries), batch)):
            chunk = queries[start:start + batch]
            shard = root / f"{k:05d}"
            table = self._load_shard(shard, [q.id for q in chunk])
            if table is None:
                table = score_fn(chunk)
                table.save(shard)
            parts.append(table)
        return ScoreTable.concat(parts)

    @staticmethod
    def _load_shard(shard: Path, ids: list[str]) -> ScoreTable | None:
        if not shard.exists():
            return None
        try:
            table = ScoreTable.load(shard)
            if table.ids != ids:
                raise RunDirError("it holds other queries")
            return table
        except Exception as exc:  # any unreadable shard is recomputed, whatever broke it
            logger.warning("recomputing shard %s: %s", shard, exc)
            shutil.rmtree(shard, ignore_errors=True)
            return None

    def write_table(self, name: str, rows: list[dict]) -> Path:
        """``tables/<name>.csv`` and ``.json`` (see experiments/report.py)."""
        return write_table(self.path / "tables" / name, rows)
