"""Result files and reports: the one table writer, markdown tables, report.md.

Tables are written as CSV and JSON side by side: a missing value is an empty CSV cell and JSON
``null`` (so pandas reads numeric columns as numbers), non-finite floats are ``null`` in JSON.
Markdown cells escape ``|`` (ensemble names contain it) and show missing values as "–".
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

MISSING = "–"


def _json_value(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):  # numpy scalars
        return _json_value(v.item())
    return v


def write_table(stem: str | os.PathLike, rows: list[dict]) -> Path:
    """Write ``<stem>.csv`` and ``<stem>.json`` (atomically each); columns in first-seen order."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    clean = [{k: _json_value(r.get(k)) for k in keys} for r in rows]
    tmp = stem.with_name(stem.name + ".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows([{k: "" if v is None else v for k, v in r.items()} for r in clean])
    os.replace(tmp, stem.with_suffix(".csv"))
    tmp = stem.with_name(stem.name + ".json.tmp")
    tmp.write_text(json.dumps(clean, indent=1, allow_nan=False, default=str))
    os.replace(tmp, stem.with_suffix(".json"))
    return stem.with_suffix(".csv")


def cell(v) -> str:
    """One markdown cell: floats to 3 decimals, missing values as a dash, pipes escaped."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return MISSING
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def text_table(rows: list[dict], columns: list[str]) -> str:
    """A terminal table with aligned columns (numbers right-aligned)."""
    def fmt(v):
        return cell(v).replace("\\|", "|")

    body = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in body]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows) for c in columns]
    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in body])


def write_report(path: str | os.PathLike, title: str, sections: list[tuple[str, str]], preface: str = "") -> Path:
    """``report.md``: a title, an optional preface paragraph, then one section per (heading, body)."""
    lines = [f"# {title}", ""]
    if preface:
        lines += [preface, ""]
    for head, body in sections:
        lines += [f"## {head}", "", body, ""]
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    return path
