"""Which sequence positions a hook reads or edits, accounting for padding.

A selector turns the attention mask ``[batch, seq]`` (1 = real token) into per-row absolute
indices ``[batch, k]``, or None for every position. Indices are computed from the mask, so left
padding (the scorer's) and right padding both give the right tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from .errors import HookError


def _mask_for(mask: torch.Tensor | None, batch: int, seq: int, device) -> torch.Tensor:
    if mask is None:
        return torch.ones(batch, seq, dtype=torch.long, device=device)
    # During cached generation the mask covers past tokens too; the activation only the new ones.
    return mask[:, -seq:].to(device=device, dtype=torch.long)


def _last_real(mask: torch.Tensor) -> torch.Tensor:
    seq = mask.shape[1]
    return seq - 1 - mask.flip(-1).argmax(-1)


def _first_real(mask: torch.Tensor) -> torch.Tensor:
    return mask.argmax(-1)


@dataclass(frozen=True)
class Decision:
    """The last real token of each row: the position whose logits give the first answer token.

    Captures are ``[batch, d_model]``.
    """

    squeeze = True

    def index(self, mask, batch, seq, device):
        return _last_real(_mask_for(mask, batch, seq, device)).unsqueeze(-1)


@dataclass(frozen=True)
class LastK:
    """The last ``k`` real tokens of each row, oldest first: captures ``[batch, k, d_model]``."""

    k: int
    squeeze = False

    def __post_init__(self):
        if self.k < 1:
            raise HookError(f"LastK: k must be >= 1, got {self.k}")

    def index(self, mask, batch, seq, device):
        m = _mask_for(mask, batch, seq, device)
        if int(m.sum(-1).min()) < self.k:
            raise HookError(f"LastK({self.k}): a row has fewer than {self.k} real tokens")
        offsets = torch.arange(self.k - 1, -1, -1, device=device)
        return _last_real(m).unsqueeze(-1) - offsets


@dataclass(frozen=True)
class AllPositions:
    """Every position, padding included: captures ``[batch, seq, d_model]``."""

    squeeze = False

    def index(self, mask, batch, seq, device):
        return None


@dataclass(frozen=True)
class Explicit:
    """Per-row indices counted in each row's own (unpadded) tokens.

    ``indices[b]`` lists positions for row b; 0 is the row's first real token and -1 its last,
    whatever the padding. Every row needs the same number of indices. Captures
    ``[batch, k, d_model]``.
    """

    indices: tuple[tuple[int, ...], ...]
    squeeze = False

    def __init__(self, indices):
        rows = tuple(tuple(int(i) for i in row) for row in indices)
        if not rows or len({len(r) for r in rows}) != 1 or not rows[0]:
            raise HookError("Explicit: give the same non-zero number of indices for every row")
        object.__setattr__(self, "indices", rows)

    def index(self, mask, batch, seq, device):
        if len(self.indices) != batch:
            raise HookError(f"Explicit: {len(self.indices)} rows of indices for a batch of {batch}")
        m = _mask_for(mask, batch, seq, device)
        rel = torch.tensor(self.indices, device=device)
        n_real = m.sum(-1, keepdim=True)
        if bool(((rel >= n_real) | (rel < -n_real)).any()):
            raise HookError(f"Explicit: index out of range for rows with {n_real.squeeze(-1).tolist()} real tokens")
        return torch.where(rel >= 0, _first_real(m).unsqueeze(-1) + rel, _last_real(m).unsqueeze(-1) + 1 + rel)


DECISION = Decision()
ALL = AllPositions()


def as_positions(spec) -> Decision | LastK | AllPositions | Explicit:
    """Accept a selector, "decision", "all", an int k (last k), or per-row index lists."""
    if isinstance(spec, (Decision, LastK, AllPositions, Explicit)):
        return spec
    if spec in ("decision", None):
        return DECISION
    if spec == "all":
        return ALL
    if isinstance(spec, int):
        return LastK(spec)
    if isinstance(spec, (list, tuple, torch.Tensor)):
        return Explicit(spec.tolist() if isinstance(spec, torch.Tensor) else spec)
    raise HookError(f"positions={spec!r}: use 'decision', 'all', an int k, or per-row index lists")


def gather(act: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """``[batch, seq, d] -> [batch, k, d]`` at per-row ``index [batch, k]`` (None: everything)."""
    if index is None:
        return act
    rows = torch.arange(act.shape[0], device=act.device).unsqueeze(-1)
    return act[rows, index]


def scatter(act: torch.Tensor, index: torch.Tensor | None, values: torch.Tensor) -> torch.Tensor:
    """A copy of ``act`` with ``values [batch, k, d]`` written at ``index`` (None: replaced)."""
    if index is None:
        return values
    out = act.clone()
    rows = torch.arange(act.shape[0], device=act.device).unsqueeze(-1)
    out[rows, index] = values.to(out.dtype)
    return out
