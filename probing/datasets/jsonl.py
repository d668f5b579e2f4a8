"""Generic JSONL queries: one object per line with "id", "text", "image" (a path), "label", "meta",
"group".

    {"id": "q1", "text": "How do I bake bread?", "label": "benign"}
    {"id": 2, "text": "What does the sign say?", "image": "images/sign.png", "meta": {"source": "mine"}}
    {"id": "q3-typo", "text": "Do what the image says.", "image": "images/q3.png", "group": "q3"}

"group" (optional, a string or an integer) names the request a line delivers: lines that hold one
request several ways (as text, as typography ...) share it, and cross-fitting keeps them in one
fold (`probing.analysis.folds`). It becomes ``meta["group"]`` (`probing.query.GROUP`); a group
given in "meta" works the same. A line without one is a group of its own.

Image paths are relative to the JSONL file's folder and must stay inside it (a dataset from
elsewhere cannot make mechprobe read arbitrary files) unless ``allow_outside=True``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from ..errors import DataError, MissingDataError, QueryError
from ..query import GROUP, LABELS, Query
from ._common import LoadReport, check_flag, decode_utf8, json_type, loads, missing_list, record_load

logger = logging.getLogger(__name__)

_FIELDS = {"id", "text", "image", "label", "meta", "group"}

__all__ = ["JsonlError", "load_jsonl", "save_jsonl"]


class JsonlError(DataError, QueryError):
    """A JSONL line that cannot be used; the message names the file and the line.

    It is a `DataError` (a bad record of a data file) and, as in earlier versions, a `QueryError`
    (each line is a query), so handlers written for either catch it."""


def _check_id(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or (isinstance(value, str) and not value.strip()):
        got = "an empty string" if isinstance(value, str) else json_type(value)
        raise JsonlError(f"{where}: 'id' must be a non-empty string or an integer, got {got}")
    return str(value)


def _check_fields(rec: dict, where: str) -> None:
    """Types of text, label and meta (null counts as absent for text and meta)."""
    text = rec.get("text")
    if text is not None and not isinstance(text, str):
        raise JsonlError(f"{where}: 'text' must be a string, got {json_type(text)}")
    label = rec.get("label")
    if label is not None and label not in LABELS:
        raise JsonlError(f"{where}: 'label' must be one of {list(LABELS)} or null, got {label!r}")
    meta = rec.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise JsonlError(f"{where}: 'meta' must be an object, got {json_type(meta)}")


def _meta(rec: dict, where: str) -> dict:
    """The line's meta, with its "group" field as ``meta["group"]`` (a type error names the line)."""
    meta = dict(rec.get("meta") or {})
    if rec.get("group") is None:
        return meta
    group = rec["group"]
    if isinstance(group, bool) or not isinstance(group, (str, int)) or (isinstance(group, str) and not group.strip()):
        got = "an empty string" if isinstance(group, str) else json_type(group)
        raise JsonlError(f"{where}: 'group' must be a non-empty string or an integer, got {got}")
    if meta.get(GROUP) is not None and meta[GROUP] != group:
        raise JsonlError(f"{where}: 'group' is {group!r} but 'meta' has group {meta[GROUP]!r}; give one")
    meta[GROUP] = group
    return meta


def _image_path(value: Any, folder: Path, where: str, allow_outside: bool) -> Path | None:
    """The image path of a line, relative to the dataset's folder, kept inside it unless allowed.

    The check is lexical (".." and absolute paths): a symlink the user placed inside the folder
    is the user's choice, while a path written in the file may come from anyone."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        got = "an empty string" if isinstance(value, str) else json_type(value)
        raise JsonlError(f"{where}: 'image' must be a file path (a string) or null, got {got}")
    path = folder / value  # an absolute value replaces folder
    inside = os.path.normpath(os.path.abspath(path))
    base = os.path.normpath(os.path.abspath(folder))
    if not allow_outside and os.path.commonpath([inside, base]) != base:
        raise JsonlError(f"{where}: image path {value!r} is outside the dataset's folder {folder}; move the image "
                         f"there or pass allow_outside=True if you trust this file")
    return path


def _parse_line(line: str, where: str) -> dict:
    """One line as an object with an id and known fields only; errors name file and line."""
    try:
        rec = loads(line)
    except json.JSONDecodeError as exc:
        raise JsonlError(f"{where}: not valid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(rec, dict) or "id" not in rec:
        raise JsonlError(f"{where}: each line must be an object with an 'id'")
    if getattr(rec, "repeated", ()):
        raise JsonlError(f"{where}: the field {rec.repeated[0]!r} appears twice")
    unknown = set(rec) - _FIELDS
    if unknown:
        raise JsonlError(f"{where}: unknown fields {sorted(unknown)}; allowed: {sorted(_FIELDS)}")
    return rec


def load_jsonl(path: str | os.PathLike, *, skip_missing: bool = False, report: LoadReport | None = None,
               allow_outside: bool = False) -> list[Query]:
    """Read queries from a JSONL file; blank lines are ignored.

    Args:
        path: the file; relative image paths are resolved against its folder.
        skip_missing: leave out lines whose image file is absent instead of raising.
        report: a `LoadReport` to add the counts and skipped ids to.
        allow_outside: accept image paths outside the file's folder (absolute or with "..").

    Raises:
        MissingDataError: the file, or image files (without ``skip_missing``), are absent.
        JsonlError: a line cannot be used (a `DataError` and a `QueryError`; the message names the
            file and line): invalid JSON or UTF-8, a field of the wrong type, a repeated id, or no
            queries at all.
    """
    check_flag("skip_missing", skip_missing, "JSONL")
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"queries file not found: {path}")
    try:
        text = decode_utf8(path.read_bytes(), path)
    except DataError as exc:
        raise JsonlError(str(exc)) from None
    report = report if report is not None else LoadReport()
    queries, first_line, missing = [], {}, {}
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        rec = _parse_line(line, where)
        qid = _check_id(rec["id"], where)
        if qid in first_line:
            raise JsonlError(f"{where}: duplicate id {qid!r} (first on line {first_line[qid]}); ids pair runs "
                             f"across defenses and must be unique")
        first_line[qid] = lineno
        _check_fields(rec, where)
        image = _image_path(rec.get("image"), path.parent, where, allow_outside)
        try:
            query = Query(qid, rec.get("text") or "", image, rec.get("label"), _meta(rec, where))
        except QueryError as exc:
            raise JsonlError(f"{where}: {exc}") from None
        if image is not None and not image.is_file():
            missing[qid] = (lineno, image)
            continue
        queries.append(query)
    if missing and not skip_missing:
        raise MissingDataError(f"{path}: {len(missing)} image files are missing (pass skip_missing=True to skip "
                               f"those lines): " + missing_list([f"line {n} ({p})" for n, p in missing.values()]))
    reasons = {qid: f"{path}:{n}: image not found: {image}" for qid, (n, image) in missing.items()}
    record_load(report, logger, str(path), len(queries), reasons)
    if not queries:
        raise JsonlError(f"{path}: no queries" + (f" ({len(missing)} skipped: missing images)" if missing else ""))
    return queries


def _stored_path(image: str | os.PathLike, folder: Path) -> str:
    """How `save_jsonl` writes an image path: relative to the file's folder when inside it (so
    the folder can be moved and `load_jsonl` reads it back), else absolute."""
    image = Path(os.path.abspath(image))
    try:
        return image.relative_to(os.path.abspath(folder)).as_posix()
    except ValueError:
        return str(image)


def save_jsonl(queries: list[Query], path: str | os.PathLike) -> Path:
    """Write queries whose images are paths (PIL images cannot be stored in JSONL).

    Image paths inside the file's folder are written relative to it; others stay absolute and
    need ``load_jsonl(..., allow_outside=True)`` to be read back."""
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for q in queries:
            if q.image is not None and not isinstance(q.image, (str, os.PathLike)):
                raise QueryError(f"query {q.id!r}: only image paths can be written to JSONL")
            image = _stored_path(q.image, path.parent) if q.image is not None else None
            rec = {"id": q.id, "text": q.text, "image": image, "label": q.label, "meta": q.meta}
            f.write(json.dumps(rec) + "\n")
    return path
