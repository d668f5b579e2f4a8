"""MOSSBench from a clone of its official repository (test-set license: evaluate, never train).

    <root>/data/images_information/information.json + data/images/                   benign queries
    <root>/data_contrast/images_information/information.json + data_contrast/images/ harmful ones

Split "oversensitivity" reads ``data/`` (benign queries that tend to trigger over-refusal),
split "contrast" reads ``data_contrast/`` (harmful counterparts with the same pid). Records are
keyed by pid with "image" (relative to the split's folder, e.g. "images/1.png"), "question" and
"metadata" ({"over": stimulus type, "harm": harm types, ...}). Missing image files raise one
`MissingDataError` listing them, unless ``skip_missing=True``; skipped records are logged and
returned in ``report``.

A benign record and its harmful counterpart share a pid and one of their two inputs (most share
the image, the others the question), so both carry ``meta["group"] = "mossbench-<pid>"``
(`probing.query.GROUP`): cross-fitting keeps a pair in one fold, never fitting on one half and
evaluating on the other (a mixed-label group; `probing.analysis.folds`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import DataError, InputError, MissingDataError, QueryError
from ..query import Query
from ._common import (LoadReport, UniqueIds, check_flag, check_record, finish_load, json_type, missing_list, names_option, read_json_object, require_string)

logger = logging.getLogger(__name__)

#: split name -> (folder in the repository, label of its queries)
SPLITS = {"oversensitivity": ("data", "benign"), "contrast": ("data_contrast", "harmful")}
INFO = Path("images_information") / "information.json"

__all__ = ["LoadReport", "SPLITS", "load_mossbench"]


def _info_file(root: Path, split: str) -> Path:
    """The split's information.json; a missing one names the layout expected (and a likely cause)."""
    info = root / SPLITS[split][0] / INFO
    if info.is_file():
        return info
    hint = ""
    if (root / split / "information.json").is_file():
        hint = " (this folder has the layout older mechprobe versions read; use a clone of the official repository)"
    elif (root / INFO).is_file():
        hint = f" ({root} looks like a split folder; pass the repository root, its parent)"
    raise MissingDataError(f"MOSSBench: {info} not found; expected a clone of the official repository with "
                           f"{SPLITS[split][0]}/{INFO.as_posix()}{hint}")


def _query(split: str, pid: str, record: dict, info: Path) -> tuple[Query, Path]:
    """The query of one record and its image path (not yet checked to exist)."""
    if "pid" in record and str(record["pid"]) != pid:
        raise DataError(f"{info}: record {pid!r} has \"pid\": {record['pid']!r}; the key and the pid must agree")
    image = record.get("image")
    if not isinstance(image, str) or not image.strip():
        got = "no 'image' field" if "image" not in record else f"'image' {json_type(image)}"
        raise DataError(f"{info}: record {pid!r} has {got}; expected a path such as \"images/{pid}.png\"")
    question = require_string(record, "question", info, pid)
    metadata = record.get("metadata", {})
    if not isinstance(metadata, dict):
        raise DataError(f"{info}: record {pid!r}: 'metadata' must be an object, got {json_type(metadata)}")
    folder, label = SPLITS[split]
    # mechprobe's own fields come last so that a metadata key cannot overwrite them
    meta = {**metadata, "dataset": "mossbench", "source": "mossbench", "kind": "image", "split": split,
            "pid": pid, "group": f"mossbench-{pid}"}
    path = info.parent.parent / image
    try:
        return Query(f"moss-{split}-{pid}", question, path, label, meta), path
    except QueryError as exc:
        raise DataError(f"{info}: record {pid!r}: {exc}") from None


def load_mossbench(root: str | os.PathLike, splits=("oversensitivity", "contrast"), *, skip_missing: bool = False,
                   report: LoadReport | None = None) -> list[Query]:
    """Queries of the chosen splits, ids ``moss-<split>-<pid>``, labels benign / harmful.

    Args:
        root: the root of a clone of the official repository (it holds ``data/`` and
            ``data_contrast/``).
        splits: "oversensitivity" (benign, ``data/``) and/or "contrast" (harmful, ``data_contrast/``).
        skip_missing: leave out records whose image file is absent instead of raising.
        report: a `LoadReport` to add the counts and skipped ids to.

    Raises:
        InputError: an unknown split.
        MissingDataError: an information.json is absent, or images are (without ``skip_missing``).
        DataError: a file or record cannot be used (the message names both), or nothing is left.
    """
    root = Path(root)
    splits = names_option("splits", splits, "MOSSBench")
    check_flag("skip_missing", skip_missing, "MOSSBench")
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise InputError(f"unknown MOSSBench split(s) {unknown}; choose from {list(SPLITS)}")
    report = report if report is not None else LoadReport()
    queries, missing, ids = [], {}, UniqueIds()
    for split in splits:
        info = _info_file(root, split)
        for pid, record in read_json_object(info, "MOSSBench information file", "pid").items():
            query, image = _query(split, pid, check_record(record, info, pid), info)
            ids.add(query.id, f"{info} record {pid!r}")
            if image.is_file():
                queries.append(query)
            else:
                missing[query.id] = image
    if missing and not skip_missing:
        raise MissingDataError(f"MOSSBench: {len(missing)} image files are missing (pass skip_missing=True to skip "
                               f"those records): " + missing_list([f"{q} ({p})" for q, p in missing.items()]))
    return finish_load("MOSSBench", queries, missing, report, logger, f"{root}, splits {splits}")
