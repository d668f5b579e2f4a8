"""ScoreTable: the result of scoring queries under one condition, saved as safetensors + JSON."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from .errors import InputError, MissingDataError, ScoringError, UnknownQueryError

_TENSORS = "scores.safetensors"
_TABLE = "table.json"
#: The files of a saved ScoreTable, in the order `file_digests` hashes them.
FILES = (_TENSORS, _TABLE)


def file_digests(path: str | os.PathLike) -> dict[str, str]:
    """sha256 of each file of a saved ScoreTable (``{file name: hex digest}``): a checksum that a
    flipped bit, a truncation or a copy from elsewhere changes. Raises `MissingDataError` if a file
    is absent."""
    path = Path(path)
    out = {}
    for name in FILES:
        h = hashlib.sha256()
        try:
            with open(path / name, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        except FileNotFoundError:
            raise MissingDataError(f"not a ScoreTable directory (no {name}): {path}") from None
        out[name] = h.hexdigest()
    return out


@dataclass
class ScoreTable:
    """Scores of N queries, in input order.

    Attributes:
        ids: query ids ``[N]``.
        labels: "harmful" / "benign" / None ``[N]``.
        margin: refusal margin at the output ``[N]`` (float32).
        lens_margin: margin read from each captured layer through the final norm ``[N, L]``.
        layers: the layer index of each lens column ``[L]``.
        hidden: decision-position residuals ``[N, L, d_model]`` (float32, CPU) or None.
        meta: model, readout, token ids, condition / defense name and parameters.
        row_meta: one dict per row ``[N]``: the query's text and scalar metadata (dataset, kind,
            scenario, split ...) and, under multi-sample defenses, its number of variants, so
            analyses group rows without parsing ids.
    """

    ids: list[str]
    labels: list[str | None]
    margin: torch.Tensor
    lens_margin: torch.Tensor
    layers: list[int]
    hidden: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)
    row_meta: list[dict] = field(default_factory=list)

    def __post_init__(self):
        n = len(self.ids)
        if not self.row_meta:
            self.row_meta = [{} for _ in range(n)]
        if len(self.row_meta) != n:
            raise InputError(f"ScoreTable: {len(self.row_meta)} row_meta entries for {n} rows")
        if len(self.labels) != n or self.margin.shape != (n,):
            raise InputError(f"ScoreTable: ids ({n}), labels ({len(self.labels)}) and margin "
                             f"{tuple(self.margin.shape)} disagree")
        if self.lens_margin.shape != (n, len(self.layers)):
            raise InputError(f"ScoreTable: lens_margin {tuple(self.lens_margin.shape)} is not "
                             f"[{n}, {len(self.layers)}]")
        if self.hidden is not None and tuple(self.hidden.shape[:2]) != (n, len(self.layers)):
            raise InputError(f"ScoreTable: hidden {tuple(self.hidden.shape)} is not [{n}, {len(self.layers)}, d]")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def p_refuse(self) -> torch.Tensor:
        """sigmoid(margin) ``[N]``."""
        return torch.sigmoid(self.margin)

    def index_of(self, ids: list[str]) -> list[int]:
        pos = {qid: i for i, qid in enumerate(self.ids)}
        missing = [q for q in ids if q not in pos]
        if missing:
            raise UnknownQueryError(f"query ids not in this table: {missing[:5]}{'...' if len(missing) > 5 else ''}")
        return [pos[q] for q in ids]

    def select(self, ids: list[str]) -> "ScoreTable":
        """The rows for ``ids``, in that order."""
        rows = self.index_of(ids)
        idx = torch.tensor(rows, dtype=torch.long)
        return ScoreTable(
            [self.ids[i] for i in rows], [self.labels[i] for i in rows],
            self.margin[idx], self.lens_margin[idx], list(self.layers),
            None if self.hidden is None else self.hidden[idx], dict(self.meta),
            [dict(self.row_meta[i]) for i in rows],
        )

    @staticmethod
    def concat(tables: list["ScoreTable"]) -> "ScoreTable":
        """Rows of several tables of the same condition, in order."""
        if not tables:
            raise InputError("ScoreTable.concat needs at least one table")
        first = tables[0]
        if any(t.layers != first.layers for t in tables):
            raise InputError("ScoreTable.concat: tables capture different layers")
        hidden = None if any(t.hidden is None for t in tables) else torch.cat([t.hidden for t in tables])
        return ScoreTable(
            [i for t in tables for i in t.ids], [lab for t in tables for lab in t.labels],
            torch.cat([t.margin for t in tables]), torch.cat([t.lens_margin for t in tables]),
            list(first.layers), hidden, dict(first.meta), [dict(r) for t in tables for r in t.row_meta],
        )

    def check_finite(self, where: str = "") -> None:
        """Raise `ScoringError` naming the queries (and ``where``: a shard, a condition) whose margin or
        lens margins are NaN or infinite."""
        bad = ~torch.isfinite(self.margin)
        if self.lens_margin.numel():
            bad |= ~torch.isfinite(self.lens_margin).all(1)
        if bool(bad.any()):
            rows = bad.nonzero().flatten().tolist()
            ids = [self.ids[i] for i in rows]
            first = rows[0]
            value = self.margin[first].item()
            what = f"margin {value}" if not math.isfinite(value) else "a non-finite lens margin"
            at = f"{where}: " if where else ""
            raise ScoringError(f"{at}non-finite scores for {len(ids)} quer{'y' if len(ids) == 1 else 'ies'} "
                               f"{ids[:5]}{'...' if len(ids) > 5 else ''} (query {ids[0]!r}: {what}); check the "
                               f"model's dtype (float16 overflows) and its weights")

    def to_records(self) -> list[dict]:
        """One dict per query: id, label, margin, p_refuse."""
        p = self.p_refuse.tolist()
        return [
            {"id": i, "label": lab, "margin": m, "p_refuse": pr}
            for i, lab, m, pr in zip(self.ids, self.labels, self.margin.tolist(), p)
        ]

    def to_pandas(self, condition: str | None = None):
        """A pandas DataFrame, one row per query: id, dataset, kind, scenario, label, text,
        condition, margin, p_refuse, then the rest of the row's metadata (pandas imported lazily).

        ``condition`` defaults to the table's ``meta["condition"]``."""
        import pandas as pd

        condition = condition if condition is not None else self.meta.get("condition")
        front = ("id", "dataset", "kind", "scenario", "label", "text", "condition", "margin", "p_refuse")
        rows = []
        for rec, meta in zip(self.to_records(), self.row_meta):
            row = {"id": rec["id"], "dataset": meta.get("dataset"), "kind": meta.get("kind"),
                   "scenario": meta.get("scenario"), "label": rec["label"], "text": meta.get("text"),
                   "condition": condition, "margin": rec["margin"], "p_refuse": rec["p_refuse"]}
            row.update({k: v for k, v in meta.items() if k not in front})
            rows.append(row)
        return pd.DataFrame(rows, columns=list(dict.fromkeys([*front, *(k for r in rows for k in r)])))

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path/`` (scores.safetensors + table.json); files appear atomically."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {"margin": self.margin.float().contiguous(),
                   "lens_margin": self.lens_margin.float().contiguous()}
        if self.hidden is not None:
            tensors["hidden"] = self.hidden.float().contiguous()
        table = {"ids": self.ids, "labels": self.labels, "layers": self.layers, "meta": self.meta,
                 "row_meta": self.row_meta}
        tmp_t, tmp_j = path / (_TENSORS + ".tmp"), path / (_TABLE + ".tmp")
        save_file(tensors, str(tmp_t))
        tmp_j.write_text(json.dumps(table, indent=1, default=str))
        os.replace(tmp_t, path / _TENSORS)
        os.replace(tmp_j, path / _TABLE)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ScoreTable":
        path = Path(path)
        for name in (_TENSORS, _TABLE):
            if not (path / name).is_file():
                raise MissingDataError(f"not a ScoreTable directory (no {name}): {path}")
        tensors = load_file(str(path / _TENSORS))
        table = json.loads((path / _TABLE).read_text())
        return cls(table["ids"], table["labels"], tensors["margin"], tensors["lens_margin"],
                   table["layers"], tensors.get("hidden"), table.get("meta", {}), table.get("row_meta") or [])
