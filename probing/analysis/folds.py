"""Cross-fitting folds that keep every request whole.

A dataset may hold one request several times under different ids: the toy's test split has each
phrase as text, typography and picture; MM-SafetyBench has each question as SD, TYPO, SD_TYPO and
TEXT. A direction or probe fitted on one delivery and evaluated on another is not out of sample,
so folds are dealt by **group**: a query's ``meta["group"]`` (`probing.query.GROUP`, kept in its
ScoreTable row), or the query itself (its id) when it has none. Variants of one query (NI's K
copies) share its id and are one row of a table, so they are never split either.

The rule (`grouped_folds`), for the labelled queries (harmful / benign):

1. Each group gets a stratum from the labels of its queries: harmful only, both (a mixed group,
   e.g. a MOSSBench pair: a benign request and its harmful counterpart on one image), benign
   only. A mixed group stays whole; it is not split by label.
2. Within a stratum the groups are ordered largest first (queries), ties in an order drawn from
   the seed over the sorted group names.
3. The groups are dealt round-robin over the folds, harmful-only, then mixed, then benign-only,
   one counter running through all three. So the groups holding harmful queries (harmful-only
   and mixed) are dealt consecutively, and so are those holding benign queries (mixed and
   benign-only): each fold gets as many groups of each class as any other, give or take one, and
   every fold holds both classes when at least ``n_folds`` groups hold each class.

A fold depends on the ids, groups, labels and seed only, not on the order of the rows. With no
groups at all (every query its own group), the folds are stratified by label over query ids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..errors import InputError
from ..query import GROUP, LABELS

#: The strata in dealing order: harmful only, mixed, benign only.
_STRATA = (frozenset({"harmful"}), frozenset(LABELS), frozenset({"benign"}))


def group_key(qid: str, group) -> tuple[str, str]:
    """The group a row belongs to: ``("group", name)``, or ``("id", qid)`` for a row without a group
    (so a group name that happens to equal another query's id does not merge them)."""
    return ("id", str(qid)) if group is None else ("group", str(group))


def row_groups(row_meta: Sequence[Mapping]) -> list:
    """``meta["group"]`` of each row (None where absent: tables saved before groups existed)."""
    return [meta.get(GROUP) for meta in row_meta]


def _labelled_groups(ids: Sequence[str], labels: Sequence, groups: Sequence | None) -> dict[tuple, list[int]]:
    """Rows of every group, labelled rows only, in row order."""
    groups = [None] * len(ids) if groups is None else list(groups)
    if len(groups) != len(ids):
        raise InputError(f"{len(groups)} groups given for {len(ids)} rows")
    out: dict[tuple, list[int]] = {}
    for i, (qid, lab, g) in enumerate(zip(ids, labels, groups)):
        if lab in LABELS:
            out.setdefault(group_key(qid, g), []).append(i)
    return out


def groups_per_class(ids: Sequence[str], labels: Sequence, groups: Sequence | None = None) -> dict[str, int]:
    """How many groups hold queries of each label (a mixed group counts for both): the most
    folds in which every fold can hold both classes."""
    members = _labelled_groups(ids, labels, groups)
    return {lab: sum(any(labels[i] == lab for i in rows) for rows in members.values()) for lab in LABELS}


def grouped_folds(ids: Sequence[str], labels: Sequence, groups: Sequence | None, n_folds: int,
                  seed: int) -> dict[str, int]:
    """Fold of every labelled row, ``{id: fold}`` (the module's rule): a group's rows share a fold,
    the classes are spread over the folds as evenly as whole groups allow. ``groups``: each row's
    group name or None (None for all: every row its own group). Unlabelled rows get no fold."""
    members = _labelled_groups(ids, labels, groups)
    rng = np.random.default_rng(seed)
    folds: dict[str, int] = {}
    dealt = 0
    for stratum in _STRATA:
        keys = sorted(k for k, rows in members.items() if frozenset(labels[i] for i in rows) == stratum)
        drawn = [keys[i] for i in rng.permutation(len(keys))]
        for key in sorted(drawn, key=lambda k: -len(members[k])):  # stable: ties keep the drawn order
            for i in members[key]:
                folds[str(ids[i])] = dealt % n_folds
            dealt += 1
    return folds
