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

import csv
import json
import logging
import platform
import shutil
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

from .query import Query
from .score_table import ScoreTable

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

    def __init__(self, path, config: dict, *, overwrite: bool = False):
        self.path = Path(path)
        self.config = json.loads(json.dumps(config, default=str))
        cfg_file = self.path / "config.json"
        if overwrite and self.path.exists():
            shutil.rmtree(self.path)
        if cfg_file.is_file():
            old = json.loads(cfg_file.read_text()).get("config")
            if old != self.config:
                raise ValueError(f"{self.path} holds a run with another config; use another --out or --overwrite "
                                 f"(differs in: {sorted(k for k in set(old or {}) | set(self.config) if (old or {}).get(k) != self.config.get(k))})")
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
                raise ValueError("it holds other queries")
            return table
        except Exception as exc:  # any unreadable shard is recomputed, whatever broke it
            logger.warning("recomputing shard %s: %s", shard, exc)
            shutil.rmtree(shard, ignore_errors=True)
            return None

    def write_table(self, name: str, rows: list[dict]) -> Path:
        out = self.path / "tables"
        out.mkdir(exist_ok=True)
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with (out / f"{name}.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows([{k: r.get(k, "") for k in keys} for r in rows])
        (out / f"{name}.json").write_text(json.dumps(rows, indent=1, default=float))
        return out / f"{name}.csv"


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
