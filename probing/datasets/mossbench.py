"""MOSSBench from a local copy in the official layout (test-set license: evaluate, never train).

    <root>/oversensitivity/information.json + images/   benign queries that trigger over-refusal
    <root>/contrast/information.json + images/          harmful counterparts (same pid and image)

Records are keyed by pid with "image", "question" and "metadata" ({"over": stimulus type,
"harm": harm types, ...}). Missing image files raise one error listing them all, unless
``skip_missing=True``; skipped records are logged and returned in ``report``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..query import Query

logger = logging.getLogger(__name__)
SPLITS = {"oversensitivity": "benign", "contrast": "harmful"}


@dataclass
class LoadReport:
    """What a loader kept and skipped."""

    loaded: int = 0
    skipped: list[str] = field(default_factory=list)


def load_mossbench(root: str | os.PathLike, splits=("oversensitivity", "contrast"), *, skip_missing: bool = False,
                   report: LoadReport | None = None) -> list[Query]:
    """Queries of the chosen splits, ids ``moss-<split>-<pid>``, labels benign / harmful."""
    root = Path(root)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown MOSSBench split(s) {unknown}; choose from {list(SPLITS)}")
    report = report if report is not None else LoadReport()
    queries, missing = [], []
    for split in splits:
        info = root / split / "information.json"
        if not info.is_file():
            raise FileNotFoundError(f"MOSSBench: {info} not found (expected <root>/{split}/information.json)")
        try:
            records = json.loads(info.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"MOSSBench: {info} is not valid JSON ({exc.msg})") from None
        items = records.items() if isinstance(records, dict) else ((str(r.get("pid")), r) for r in records)
        for pid, rec in items:
            for key in ("image", "question"):
                if key not in rec:
                    raise ValueError(f"MOSSBench: {info}: record {pid!r} has no {key!r}")
            image = root / split / rec["image"]
            qid = f"moss-{split}-{pid}"
            if not image.is_file():
                missing.append(f"{qid} ({image})")
                continue
            meta = {"source": "mossbench", "split": split, "pid": str(pid), **(rec.get("metadata") or {})}
            queries.append(Query(qid, rec["question"], image, SPLITS[split], meta))
    if missing and not skip_missing:
        raise FileNotFoundError(f"MOSSBench: {len(missing)} image files are missing (pass skip_missing=True to "
                                f"skip those records): " + "; ".join(missing))
    if missing:
        logger.warning("MOSSBench: skipped %d records whose images are missing", len(missing))
    report.loaded += len(queries)
    report.skipped += [m.split(" ")[0] for m in missing]
    return queries
