"""What the dataset loaders share: reading JSON files with errors that name the file and the
record, unique ids across a dataset, and the report of what was skipped.

Every problem with a file or record raises one `DataError` (or `MissingDataError` for absent
files) whose message names the file and the record or line, so a user can fix the data without
a traceback.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError, InputError, MissingDataError

logger = logging.getLogger(__name__)

#: How many missing files an error lists before it only counts the rest.
SHOW_MISSING = 10


@dataclass
class LoadReport:
    """What a loader kept and skipped; pass one to several loaders to add up their counts.

    Attributes:
        loaded: number of queries returned.
        skipped: ids of the records left out (``skip_missing=True``), in the order met.
        reasons: why each skipped id was left out (e.g. "image not found: <path>").
    """

    loaded: int = 0
    skipped: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)

    def skip(self, qid: str, reason: str) -> None:
        """Record that query `qid` was left out, and why."""
        self.skipped.append(qid)
        self.reasons[qid] = reason


def json_type(value: Any) -> str:
    """The JSON name of a value's type, for messages about data files ("null", not "NoneType")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def decode_utf8(data: bytes, path: Path) -> str:
    """`data` as text; a file that is not UTF-8 raises a `DataError` naming the line and byte.

    A UTF-8 byte-order mark is accepted (editors on Windows write one)."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at column {column}); "
                        f"save the file as UTF-8") from None


def read_text(path: Path, what: str) -> str:
    """The UTF-8 text of `path`; `MissingDataError` naming `what` the file is when it is absent."""
    if not path.is_file():
        raise MissingDataError(f"{what} not found: {path}")
    return decode_utf8(path.read_bytes(), path)


class _Object(dict):
    """A parsed JSON object that remembers keys repeated in the file (`json` keeps the last)."""

    repeated: tuple[str, ...] = ()


def _object_pairs(pairs: list[tuple[str, Any]]) -> dict:
    obj = _Object(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        obj.repeated = tuple(k for k, _ in pairs if k in seen or seen.add(k))
    return obj


def loads(text: str) -> Any:
    """`json.loads` whose objects record repeated keys in ``.repeated`` (see `_Object`)."""
    return json.loads(text, object_pairs_hook=_object_pairs)


def parse_json(text: str, path: Path) -> Any:
    """Parse `text` (the content of `path`); invalid JSON raises a `DataError` with line and column."""
    try:
        return loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None


def read_json_object(path: Path, what: str, keyed_by: str) -> dict:
    """A JSON file whose top level is an object of records keyed by `keyed_by`.

    Raises `MissingDataError` if absent, `DataError` for invalid JSON or encoding, a top level
    that is not an object, or a key repeated in it (JSON parsers silently keep the last record).
    """
    data = parse_json(read_text(path, what), path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: the top level is {json_type(data)}; expected an object of records keyed by "
                        f"{keyed_by}")
    if getattr(data, "repeated", ()):
        raise DataError(f"{path}: record {data.repeated[0]!r} appears more than once in the file "
                        f"(a later record would silently replace the earlier one)")
    return data


def check_record(record: Any, path: Path, key: str) -> dict:
    """`record` (the value under `key` in `path`) if it is a JSON object without repeated fields."""
    if not isinstance(record, dict):
        raise DataError(f"{path}: record {key!r} is {json_type(record)}; expected an object")
    if getattr(record, "repeated", ()):
        raise DataError(f"{path}: record {key!r} has the field {record.repeated[0]!r} more than once")
    return record


def require_string(record: dict, name: str, path: Path, key: str, needed_by: str = "") -> str:
    """The non-empty string field `name` of a record; `DataError` naming file and record otherwise."""
    if name not in record:
        raise DataError(f"{path}: record {key!r} has no {name!r} field{needed_by}")
    value = record[name]
    if not isinstance(value, str) or not value.strip():
        got = "an empty string" if isinstance(value, str) else json_type(value)
        raise DataError(f"{path}: record {key!r}: {name!r} must be a non-empty string, got {got}")
    return value


class UniqueIds:
    """Query ids seen so far and where; ids pair runs across defenses, so a repeat is an error."""

    def __init__(self) -> None:
        self._where: dict[str, str] = {}

    def add(self, qid: str, where: str) -> None:
        """Register `qid` found at `where` (file and record); a repeat names both places."""
        if qid in self._where:
            raise DataError(f"duplicate query id {qid!r}: {self._where[qid]} and {where}")
        self._where[qid] = where


def missing_list(items: list[str]) -> str:
    """The first `SHOW_MISSING` of `items`, joined, with a count of the rest."""
    shown = "; ".join(items[:SHOW_MISSING])
    rest = len(items) - SHOW_MISSING
    return shown + (f"; ... and {rest} more" if rest > 0 else "")


def record_load(report: LoadReport, log: logging.Logger, dataset: str, loaded: int,
                skipped: dict[str, str]) -> None:
    """Add a loader's counts and skipped ids (id -> reason) to `report`, with one warning
    summarising the skipped records (none when nothing was skipped)."""
    for qid, reason in skipped.items():
        report.skip(qid, reason)
    report.loaded += loaded
    if skipped:
        first = next(iter(skipped.items()))
        log.warning("%s: loaded %d queries, skipped %d whose files are missing (first: %s, %s); "
                    "see LoadReport.reasons for all", dataset, loaded, len(skipped), *first)


def finish_load(dataset: str, queries: list, missing: dict, report: LoadReport, log: logging.Logger,
                empty_context: str) -> list:
    """Record what a loader kept and skipped (missing files), and refuse an empty result naming
    what was asked for (``empty_context``)."""
    reasons = {qid: f"image not found: {path}" for qid, path in missing.items()}
    record_load(report, log, dataset, len(queries), reasons)
    if not queries:
        raise DataError(f"{dataset}: no queries: {empty_context}; {len(missing)} records skipped (missing images)")
    return queries


def check_flag(name: str, value: Any, loader: str) -> bool:
    """``value`` of a loader's on/off option, which must be a bool: a string such as "false" would
    otherwise count as true and do the opposite of what was written."""
    if not isinstance(value, bool):
        raise InputError(f"{loader}: option {name!r} must be true or false, got {value!r}")
    return value


def names_option(name: str, value: Any, loader: str) -> list:
    """A loader's option that takes one name or a list of names, as a list (each a string)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
        raise InputError(f"{loader}: option {name!r} must be a name or a list of names, got {value!r}")
    return list(items)
