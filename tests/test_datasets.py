"""Benchmark loaders on fixtures in the official layouts, and on the real MOSSBench copy."""

import json
from pathlib import Path

import pytest

from probing.datasets import LoadReport, load_mmsafetybench, load_mossbench
from probing.query import QueryError

from .conftest import noise_image

SHARED_MOSS = Path(__file__).resolve().parents[2] / "shared" / "data" / "mossbench"


def make_mmsb(root: Path, scenarios=("01-Illegal_Activitiy", "06-Fraud"), n=3, drop=None):
    (root / "processed_questions").mkdir(parents=True)
    for s in scenarios:
        recs = {}
        for i in range(n):
            recs[str(i)] = {"Question": f"{s} question {i}?", "Changed Question": "c", "Key Phrase": f"phrase {i}",
                            "Phrase Type": "activity", "Rephrased Question": f"The image shows a phrase {i}.",
                            "Rephrased Question(SD)": f"The image shows an activity {i}."}
            for kind in ("SD", "SD_TYPO", "TYPO"):
                d = root / "imgs" / s / kind
                d.mkdir(parents=True, exist_ok=True)
                if drop != (s, kind, str(i)):
                    noise_image(i, size=(64, 64)).save(d / f"{i}.jpg")
        (root / "processed_questions" / f"{s}.json").write_text(json.dumps(recs))
    return root


def test_mmsafetybench_kinds_fields_and_filters(tmp_path):
    root = make_mmsb(tmp_path)
    qs = load_mmsafetybench(root)
    assert len(qs) == 2 * 3 * 4 and all(q.label == "harmful" for q in qs)
    by = {q.id: q for q in qs}
    sd = by["mmsb-06-Fraud-1-SD"]
    assert sd.text == "The image shows an activity 1." and sd.image == root / "imgs/06-Fraud/SD/1.jpg"
    assert by["mmsb-06-Fraud-1-TYPO"].text == "The image shows a phrase 1."
    assert by["mmsb-06-Fraud-1-text"].image is None and by["mmsb-06-Fraud-1-text"].text == "06-Fraud question 1?"
    assert sd.meta["key_phrase"] == "phrase 1" and sd.meta["scenario"] == "06-Fraud"
    only = load_mmsafetybench(root, scenarios=["06-Fraud"], kinds=["TYPO"])
    assert [q.id for q in only] == [f"mmsb-06-Fraud-{i}-TYPO" for i in range(3)]
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps([{"Scenario": "01-Illegal_Activitiy", "Sampled_ID_List": [0, 2]}]))
    sub = load_mmsafetybench(root, kinds=["text"], subset=tiny)
    assert [q.id for q in sub] == ["mmsb-01-Illegal_Activitiy-0-text", "mmsb-01-Illegal_Activitiy-2-text"]


def test_mmsafetybench_errors(tmp_path):
    root = make_mmsb(tmp_path, drop=("06-Fraud", "SD", "2"))
    with pytest.raises(FileNotFoundError, match="06-Fraud/SD/2.jpg"):
        load_mmsafetybench(root)
    with pytest.raises(ValueError, match="unknown MM-SafetyBench kind"):
        load_mmsafetybench(root, kinds=["VIDEO"])
    with pytest.raises(ValueError, match="unknown MM-SafetyBench scenario"):
        load_mmsafetybench(root, scenarios=["01-Illegal_Activity"])  # the official name keeps the typo
    with pytest.raises(FileNotFoundError, match="processed_questions"):
        load_mmsafetybench(tmp_path / "nowhere")


def make_moss(root: Path, missing_pid=None):
    for split, q in (("oversensitivity", "How do I cut this cake?"), ("contrast", "How do I hurt someone with this?")):
        (root / split / "images").mkdir(parents=True)
        recs = {}
        for pid in ("1", "2", "3"):
            recs[pid] = {"image": f"images/{pid}.jpg", "question": f"{q} ({pid})", "pid": pid,
                         "metadata": {"over": "type 1", "harm": [7]}}
            if pid != missing_pid:
                noise_image(int(pid), size=(64, 64)).save(root / split / "images" / f"{pid}.jpg")
        (root / split / "information.json").write_text(json.dumps(recs))
    return root


def test_mossbench_fixture_and_missing_images(tmp_path):
    root = make_moss(tmp_path, missing_pid="2")
    with pytest.raises(FileNotFoundError, match=r"2 image files are missing.*moss-oversensitivity-2.*moss-contrast-2"):
        load_mossbench(root)
    report = LoadReport()
    qs = load_mossbench(root, skip_missing=True, report=report)
    assert [q.id for q in qs] == ["moss-oversensitivity-1", "moss-oversensitivity-3", "moss-contrast-1",
                                  "moss-contrast-3"]
    assert [q.label for q in qs] == ["benign", "benign", "harmful", "harmful"]
    assert qs[0].meta["over"] == "type 1" and report.skipped == ["moss-oversensitivity-2", "moss-contrast-2"]
    with pytest.raises(ValueError, match="unknown MOSSBench split"):
        load_mossbench(root, splits=["benign"])


@pytest.mark.skipif(not SHARED_MOSS.is_dir(), reason="needs ../shared/data/mossbench")
def test_real_mossbench_copy():
    report = LoadReport()
    qs = load_mossbench(SHARED_MOSS, skip_missing=True, report=report)
    assert sum(q.label == "benign" for q in qs) == 289 and sum(q.label == "harmful" for q in qs) == 235
    assert len(report.skipped) == 20 and "moss-oversensitivity-21" in report.skipped
    assert all(Path(q.image).is_file() for q in qs)
    contrast = {q.meta["pid"]: q for q in qs if q.label == "harmful"}
    benign = {q.meta["pid"]: q for q in qs if q.label == "benign"}
    shared = set(contrast) & set(benign)
    assert shared and all(Path(contrast[p].image).name == Path(benign[p].image).name for p in shared)


def test_query_error_is_a_value_error():
    assert issubclass(QueryError, ValueError)
