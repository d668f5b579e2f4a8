"""MM-SafetyBench from a clone of its official repository (research evaluation only).

    <root>/data/processed_questions/<scenario>.json   {qid: {"Question", "Key Phrase", "Phrase Type",
                                                       "Rephrased Question", "Rephrased Question(SD)", ...}}
    <root>/TinyVersion_ID_List.json                   the official tiny subset
    <images>/<scenario>/{SD,SD_TYPO,TYPO}/<qid>.jpg   default <root>/data/imgs (where the official
                                                      scripts write); the official download unpacks
                                                      to "MM-SafetyBench(imgs)" with the same layout

Kinds: ``SD`` (Stable Diffusion image, text "Rephrased Question(SD)"), ``SD_TYPO`` and ``TYPO``
(text "Rephrased Question"), and ``TEXT`` ("Question", no image). Every query is labelled
harmful. The official evaluation judges 08-Political_Lobbying and 10-13 by their own criteria
rather than by harmfulness; their queries carry ``meta["own_criteria"] = True`` so that a study
can keep or drop them (``own_criteria=False`` drops them here). The kinds of one question share
``meta["group"] = "mmsb-<scenario>-<qid>"`` (`probing.query.GROUP`): one request, kept in one
cross-fitting fold.
"""

from __future__ import annotations

import difflib
import logging
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..errors import DataError, InputError, MissingDataError, QueryError
from ..query import Query
from ._common import (LoadReport, UniqueIds, check_flag, check_record, finish_load, json_type, missing_list, names_option, parse_json, read_json_object, read_text, require_string)

logger = logging.getLogger(__name__)

SCENARIOS = (
    "01-Illegal_Activitiy", "02-HateSpeech", "03-Malware_Generation", "04-Physical_Harm", "05-EconomicHarm",
    "06-Fraud", "07-Sex", "08-Political_Lobbying", "09-Privacy_Violence", "10-Legal_Opinion",
    "11-Financial_Advice", "12-Health_Consultation", "13-Gov_Decision",
)
#: Scenarios the official evaluation judges by their own criteria, not by harmfulness.
OWN_CRITERIA = ("08-Political_Lobbying", "10-Legal_Opinion", "11-Financial_Advice", "12-Health_Consultation",
                "13-Gov_Decision")
KINDS = ("SD", "SD_TYPO", "TYPO", "TEXT")
_TEXT_FIELD = {"SD": "Rephrased Question(SD)", "SD_TYPO": "Rephrased Question", "TYPO": "Rephrased Question",
               "TEXT": "Question"}
#: The id suffix of each kind; TEXT keeps "text", its name in earlier versions, so that
#: ids of earlier runs still pair.
_ID_SUFFIX = {"SD": "SD", "SD_TYPO": "SD_TYPO", "TYPO": "TYPO", "TEXT": "text"}
QUESTIONS = Path("data") / "processed_questions"
TINY = "TinyVersion_ID_List.json"
IMAGES = Path("data") / "imgs"

__all__ = ["KINDS", "OWN_CRITERIA", "SCENARIOS", "load_mmsafetybench", "load_tiny_subset", "resolve_scenario"]


def _did_you_mean(name: str, choices: Iterable[str]) -> str:
    """"; did you mean 'X'?" for the closest of `choices` ignoring case, or "" if none is close."""
    by_lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.6)
    return f"; did you mean {by_lower[close[0]]!r}?" if close else ""


def resolve_scenario(name: str | int) -> str:
    """The official scenario name for a full name ("01-Illegal_Activitiy") or a number (1, "01", "1").

    Raises:
        InputError: an unknown name or number, with the closest official name.
    """
    if isinstance(name, int) and not isinstance(name, bool):
        if 1 <= name <= len(SCENARIOS):
            return SCENARIOS[name - 1]
        raise InputError(f"unknown MM-SafetyBench scenario number {name}; choose 1..{len(SCENARIOS)}")
    if not isinstance(name, str):
        raise InputError(f"MM-SafetyBench scenario must be a name or a number, got {type(name).__name__}")
    if name in SCENARIOS:
        return name
    if name.strip().isdigit():
        return resolve_scenario(int(name))
    raise InputError(f"unknown MM-SafetyBench scenario {name!r}{_did_you_mean(name, SCENARIOS)} "
                     f"(names or numbers 1..{len(SCENARIOS)}; the official names keep their typos)")


def _resolve_kinds(kinds) -> list[str]:
    """Kinds in the caller's order; "text" is accepted as a deprecated name of "TEXT"."""
    kinds = names_option("kinds", kinds, "MM-SafetyBench")
    if not kinds:
        raise InputError(f"no MM-SafetyBench kind given; choose from {KINDS}")
    out = []
    for kind in kinds:
        if kind == "text":
            warnings.warn('MM-SafetyBench kind "text" is deprecated; use "TEXT"', DeprecationWarning, stacklevel=3)
            kind = "TEXT"
        if kind not in KINDS:
            raise InputError(f"unknown MM-SafetyBench kind {kind!r} (choose from {KINDS})"
                             f"{_did_you_mean(str(kind), KINDS)}")
        if kind not in out:
            out.append(kind)
    return out


def load_tiny_subset(path: str | os.PathLike) -> dict[str, set[str]]:
    """The official tiny subset file (a JSON list of {"Scenario", "Sampled_ID_List"}) as {scenario: ids}.

    Raises:
        MissingDataError: the file is absent.
        DataError: the file is not such a list; the message names the file and the entry.
    """
    path = Path(path)
    entries = parse_json(read_text(path, "MM-SafetyBench subset file"), path)
    if not isinstance(entries, list):
        raise DataError(f"{path}: the top level is {json_type(entries)}; expected a list of "
                        f"{{'Scenario', 'Sampled_ID_List'}} objects")
    subset: dict[str, set[str]] = {}
    for i, entry in enumerate(entries):
        where = f"{path}: entry {i}"
        if not isinstance(entry, dict) or not {"Scenario", "Sampled_ID_List"} <= set(entry):
            raise DataError(f"{where} is not an object with 'Scenario' and 'Sampled_ID_List'")
        ids = entry["Sampled_ID_List"]
        if not isinstance(ids, list) or not all(isinstance(x, (int, str)) and not isinstance(x, bool) for x in ids):
            raise DataError(f"{where}: 'Sampled_ID_List' must be a list of ids, got {json_type(ids)}")
        try:
            scenario = resolve_scenario(entry["Scenario"])
        except InputError as exc:
            raise DataError(f"{where}: {exc}") from None
        subset.setdefault(scenario, set()).update(str(x) for x in ids)
    return subset


def _resolve_subset(subset, root: Path) -> dict[str, set[str]] | None:
    """None, "tiny" (root/TinyVersion_ID_List.json), a path, or a {scenario: ids} mapping."""
    if subset is None:
        return None
    if isinstance(subset, str) and subset == "tiny":
        return load_tiny_subset(root / TINY)
    if isinstance(subset, (str, os.PathLike)):
        return load_tiny_subset(subset)
    if isinstance(subset, Mapping):
        out: dict[str, set[str]] = {}
        for scenario, ids in subset.items():
            ids = [ids] if isinstance(ids, (str, int)) else ids
            out.setdefault(resolve_scenario(scenario), set()).update(str(x) for x in ids)
        return out
    raise InputError(f"MM-SafetyBench subset must be 'tiny', a path or a {{scenario: ids}} mapping, "
                     f"got {type(subset).__name__}")


def _scenario_files(qdir: Path, scenarios) -> list[tuple[str, Path]]:
    """(scenario, question file) pairs to read.

    Explicit scenarios must all have a file. Without them every official file present is read,
    and a file with another name (a misspelt copy) is reported rather than silently ignored."""
    if scenarios is not None:
        chosen = [scenarios] if isinstance(scenarios, (str, int)) else list(scenarios)
        names = list(dict.fromkeys(resolve_scenario(s) for s in chosen))
        for name in names:
            if not (qdir / f"{name}.json").is_file():
                raise MissingDataError(f"MM-SafetyBench: question file of scenario {name!r} not found: "
                                       f"{qdir / (name + '.json')}")
        return [(name, qdir / f"{name}.json") for name in names]
    for path in sorted(qdir.glob("*.json")):
        if path.stem not in SCENARIOS:
            logger.warning("MM-SafetyBench: ignoring %s: not an official scenario name%s", path,
                           _did_you_mean(path.stem, SCENARIOS))
    absent = [s for s in SCENARIOS if not (qdir / f"{s}.json").is_file()]
    if absent:
        logger.info("MM-SafetyBench: %d scenario files absent from %s: %s", len(absent), qdir, absent)
    return [(s, qdir / f"{s}.json") for s in SCENARIOS if s not in absent]


def _optional_string(record: dict, name: str, path: Path, qid: str) -> str | None:
    value = record.get(name)
    if value is not None and not isinstance(value, str):
        raise DataError(f"{path}: record {qid!r}: {name!r} must be a string, got {json_type(value)}")
    return value


def _record_queries(scenario: str, qid: str, record: dict, kinds: list[str], path: Path,
                    images: Path) -> list[Query]:
    """The queries of one question record, one per kind (image paths not yet checked)."""
    # one question delivered as SD, TYPO, SD_TYPO and TEXT is one request: one cross-fitting group
    meta = {"dataset": "mmsafetybench", "source": "mmsafetybench", "scenario": scenario, "qid": qid,
            "group": f"mmsb-{scenario}-{qid}",
            "key_phrase": _optional_string(record, "Key Phrase", path, qid),
            "phrase_type": _optional_string(record, "Phrase Type", path, qid),
            "own_criteria": scenario in OWN_CRITERIA}
    out = []
    for kind in kinds:
        text = require_string(record, _TEXT_FIELD[kind], path, qid, f" (needed by kind {kind})")
        image = None if kind == "TEXT" else images / scenario / kind / f"{qid}.jpg"
        try:
            out.append(Query(f"mmsb-{scenario}-{qid}-{_ID_SUFFIX[kind]}", text, image, "harmful",
                             {**meta, "kind": kind}))
        except QueryError as exc:
            raise DataError(f"{path}: record {qid!r}: {exc}") from None
    return out


def _images_root(root: Path, images, kinds: list[str]) -> Path:
    """The folder of <scenario>/<kind>/<id>.jpg; it must exist when image kinds are asked for."""
    folder = root / IMAGES if images is None else Path(images)
    if folder.is_dir() or kinds == ["TEXT"]:
        return folder
    how = "pass images=<the folder holding <scenario>/<kind>/<id>.jpg, e.g. the official 'MM-SafetyBench(imgs)'>"
    raise MissingDataError(f"MM-SafetyBench: image folder not found: {folder}; {how}, or kinds=('TEXT',)")


def load_mmsafetybench(root: str | os.PathLike, *, images: str | os.PathLike | None = None, kinds=("SD_TYPO",),
                       scenarios=None, subset=None, own_criteria: bool = True, skip_missing: bool = False,
                       report: LoadReport | None = None) -> list[Query]:
    """Queries with ids ``mmsb-<scenario>-<qid>-<kind>`` (``-text`` for kind TEXT), all labelled harmful.

    Args:
        root: the root of a clone of the official repository (``data/processed_questions/``,
            ``TinyVersion_ID_List.json``).
        images: the folder laid out ``<scenario>/<kind>/<qid>.jpg`` (default ``root/data/imgs``),
            e.g. the official download "MM-SafetyBench(imgs)".
        kinds: any of "SD", "SD_TYPO", "TYPO", "TEXT" (text only; "text" is a deprecated alias).
        scenarios: names or numbers (1, "01", "01-Illegal_Activitiy") to keep; default every
            official question file present.
        subset: "tiny" (the official tiny list), the path of such a list, or {scenario: ids}.
        own_criteria: False drops the scenarios judged by their own criteria (08, 10-13).
        skip_missing: leave out queries whose image file is absent instead of raising.
        report: a `LoadReport` to add the counts and skipped ids to.

    Raises:
        InputError: an unknown kind or scenario (with a "did you mean"), or a bad subset.
        MissingDataError: the question folder, a chosen scenario's file, the subset file, the
            image folder, or images (without ``skip_missing``) are absent.
        DataError: a file or record cannot be used (the message names both), or nothing is left.
    """
    root = Path(root)
    check_flag("own_criteria", own_criteria, "MM-SafetyBench")
    check_flag("skip_missing", skip_missing, "MM-SafetyBench")
    kinds = _resolve_kinds(kinds)
    qdir = root / QUESTIONS
    if not qdir.is_dir():
        hint = " (pass the repository root, the folder that holds data/)" if (root / "processed_questions").is_dir() \
            else ""
        raise MissingDataError(f"MM-SafetyBench: question folder not found: {qdir}{hint}")
    files = _scenario_files(qdir, scenarios)
    chosen = _resolve_subset(subset, root)
    image_root = _images_root(root, images, kinds)
    if not own_criteria:
        dropped = [s for s, _ in files if s in OWN_CRITERIA]
        files = [(s, p) for s, p in files if s not in OWN_CRITERIA]
        logger.info("MM-SafetyBench: own_criteria=False drops %s", dropped)
    report = report if report is not None else LoadReport()
    queries, missing, ids = [], {}, UniqueIds()
    for scenario, path in files:
        records = read_json_object(path, "MM-SafetyBench question file", "question id")
        if chosen is not None:
            absent = sorted(chosen.get(scenario, set()) - set(records), key=lambda x: (len(x), x))
            if absent:
                logger.warning("MM-SafetyBench: subset ids %s of %s are not in %s", absent, scenario, path)
        for qid, record in records.items():
            if chosen is not None and qid not in chosen.get(scenario, ()):
                continue
            for query in _record_queries(scenario, qid, check_record(record, path, qid), kinds, path, image_root):
                ids.add(query.id, f"{path} record {qid!r}")
                if query.image is None or query.image.is_file():
                    queries.append(query)
                else:
                    missing[query.id] = query.image
    if missing and not skip_missing:
        hint = ""
        if not any((image_root / s).is_dir() for s, _ in files):
            hint = " (it holds no <scenario> folder: is it the folder laid out <scenario>/<kind>/<id>.jpg?)"
        raise MissingDataError(f"MM-SafetyBench: {len(missing)} image files are missing under {image_root}{hint} "
                               f"(pass skip_missing=True to skip those queries): "
                               + missing_list([str(p) for p in missing.values()]))
    return finish_load("MM-SafetyBench", queries, missing, report, logger,
                       f"{root} with scenarios={scenarios!r}, kinds={kinds}, subset={subset!r}, "
                       f"own_criteria={own_criteria}")
