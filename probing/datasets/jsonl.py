"""Generic JSONL queries: one object per line with id, text, image (path), label, meta."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..query import Query, QueryError

_FIELDS = {"id", "text", "image", "label", "meta"}


def load_jsonl(path: str | os.PathLike) -> list[Query]:
    """Read queries; relative image paths are resolved against the file's directory."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"queries file not found: {path}")
    queries = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise QueryError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(rec, dict) or "id" not in rec:
            raise QueryError(f"{where}: each line must be an object with an 'id'")
        unknown = set(rec) - _FIELDS
        if unknown:
            raise QueryError(f"{where}: unknown fields {sorted(unknown)}; allowed: {sorted(_FIELDS)}")
        image = rec.get("image")
        if image:
            image = Path(image) if Path(image).is_absolute() else path.parent / image
        try:
            queries.append(Query(rec["id"], rec.get("text") or "", image or None,
                                 rec.get("label"), rec.get("meta") or {}))
        except QueryError as exc:
            raise QueryError(f"{where}: {exc}") from None
    if not queries:
        raise QueryError(f"{path}: no queries")
    return queries


def save_jsonl(queries: list[Query], path: str | os.PathLike) -> Path:
    """Write queries whose images are paths (PIL images cannot be stored in JSONL)."""
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for q in queries:
            if q.image is not None and not isinstance(q.image, (str, os.PathLike)):
                raise QueryError(f"query {q.id!r}: only image paths can be written to JSONL")
            rec = {"id": q.id, "text": q.text, "image": str(q.image) if q.image else None,
                   "label": q.label, "meta": q.meta}
            f.write(json.dumps(rec) + "\n")
    return path
