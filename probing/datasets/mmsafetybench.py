"""MM-SafetyBench from a local copy in the official layout.

    <root>/processed_questions/{scenario}.json     {qid: {"Question", "Changed Question", "Key Phrase",
                                                     "Phrase Type", "Rephrased Question",
                                                     "Rephrased Question(SD)"}}
    <root>/imgs/{scenario}/{SD,SD_TYPO,TYPO}/{qid}.jpg

Kinds: ``SD`` (SD image, text "Rephrased Question(SD)"), ``SD_TYPO`` and ``TYPO`` (text
"Rephrased Question"), and ``text`` ("Question", no image). Every query is labelled harmful.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..query import Query

SCENARIOS = (
    "01-Illegal_Activitiy", "02-HateSpeech", "03-Malware_Generation", "04-Physical_Harm", "05-EconomicHarm",
    "06-Fraud", "07-Sex", "08-Political_Lobbying", "09-Privacy_Violence", "10-Legal_Opinion",
    "11-Financial_Advice", "12-Health_Consultation", "13-Gov_Decision",
)
KINDS = ("SD", "SD_TYPO", "TYPO", "text")
_TEXT_FIELD = {"SD": "Rephrased Question(SD)", "SD_TYPO": "Rephrased Question", "TYPO": "Rephrased Question",
               "text": "Question"}


def load_tiny_subset(path: str | os.PathLike) -> dict[str, set[str]]:
    """The "tiny" subset file: a JSON list of {"Scenario", "Sampled_ID_List"} -> {scenario: ids}."""
    entries = json.loads(Path(path).read_text(encoding="utf-8"))
    try:
        return {e["Scenario"]: {str(i) for i in e["Sampled_ID_List"]} for e in entries}
    except (TypeError, KeyError) as exc:
        raise ValueError(f"{path}: expected a list of {{'Scenario', 'Sampled_ID_List'}} objects ({exc})") from None


def load_mmsafetybench(root: str | os.PathLike, *, scenarios=None, kinds=KINDS, subset=None) -> list[Query]:
    """Queries with ids ``mmsb-<scenario>-<qid>-<kind>``.

    Args:
        scenarios: scenario names to keep (default: all 13 present).
        kinds: any of "SD", "SD_TYPO", "TYPO", "text".
        subset: a {scenario: ids} mapping or the path of the "tiny" subset JSON.
    """
    root = Path(root)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown MM-SafetyBench kind(s) {bad}; choose from {KINDS}")
    chosen = list(scenarios) if scenarios is not None else list(SCENARIOS)
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown MM-SafetyBench scenario(s) {unknown}; choose from {SCENARIOS}")
    if subset is not None and not isinstance(subset, dict):
        subset = load_tiny_subset(subset)
    qdir = root / "processed_questions"
    if not qdir.is_dir():
        raise FileNotFoundError(f"MM-SafetyBench: {qdir} not found")
    queries, missing = [], []
    for scenario in chosen:
        path = qdir / f"{scenario}.json"
        if not path.is_file():
            if scenarios is not None:
                raise FileNotFoundError(f"MM-SafetyBench: {path} not found")
            continue
        records = json.loads(path.read_text(encoding="utf-8"))
        for qid, rec in records.items():
            if subset is not None and str(qid) not in subset.get(scenario, set()):
                continue
            for kind in kinds:
                field = _TEXT_FIELD[kind]
                if field not in rec:
                    raise ValueError(f"MM-SafetyBench: {path}: question {qid!r} has no {field!r}")
                image = None if kind == "text" else root / "imgs" / scenario / kind / f"{qid}.jpg"
                if image is not None and not image.is_file():
                    missing.append(str(image))
                    continue
                meta = {"source": "mmsafetybench", "scenario": scenario, "qid": str(qid), "kind": kind,
                        "key_phrase": rec.get("Key Phrase"), "phrase_type": rec.get("Phrase Type")}
                queries.append(Query(f"mmsb-{scenario}-{qid}-{kind}", rec[field], image, "harmful", meta))
    if missing:
        raise FileNotFoundError(f"MM-SafetyBench: {len(missing)} image files missing: " + "; ".join(missing[:10]))
    return queries
