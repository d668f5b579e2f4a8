"""Benchmark and JSONL loaders: fixtures in the official layouts, every kind of bad file or
record (one error naming the file and the record or line), and the shared copies of MOSSBench
and MM-SafetyBench."""

import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from probing.datasets import LoadReport, load_jsonl, load_mmsafetybench, load_mossbench, load_tiny_subset, save_jsonl
from probing.errors import DataError, InputError, MissingDataError, QueryError

from .conftest import noise_image

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SHARED_MOSS = SHARED / "mossbench"
SHARED_MMSB = SHARED / "mm-safetybench"
MMSB_FILES = {"01-Illegal_Activitiy": 97, "02-HateSpeech": 163, "03-Malware_Generation": 44,
              "04-Physical_Harm": 144, "05-EconomicHarm": 122, "06-Fraud": 154, "07-Sex": 109,
              "08-Political_Lobbying": 153, "09-Privacy_Violence": 139, "10-Legal_Opinion": 130,
              "11-Financial_Advice": 167, "12-Health_Consultation": 109, "13-Gov_Decision": 149}
OWN = ("08-Political_Lobbying", "10-Legal_Opinion", "11-Financial_Advice", "12-Health_Consultation",
       "13-Gov_Decision")


# --- MOSSBench ---------------------------------------------------------------------------------

def moss_record(pid, question, **over):
    rec = {"image": f"images/{pid}.png", "short description": "s", "question": question,
           "metadata": {"over": "type 1", "human": 0, "harm": [7]}, "pid": pid, "description": "d"}
    rec.update(over)
    return rec


def make_moss(root: Path, missing_pid=None, pids=("1", "2", "3")):
    """A MOSSBench clone in the official layout: data/ (benign) and data_contrast/ (harmful)."""
    for folder, q in (("data", "How do I cut this cake?"), ("data_contrast", "How do I hurt someone with this?")):
        (root / folder / "images").mkdir(parents=True)
        (root / folder / "images_information").mkdir()
        recs = {pid: moss_record(pid, f"{q} ({pid})") for pid in pids}
        for pid in pids:
            if pid != missing_pid:
                noise_image(int(pid), size=(32, 32)).save(root / folder / "images" / f"{pid}.png")
        (root / folder / "images_information" / "information.json").write_text(json.dumps(recs, indent=1))
    return root


def moss_info(root, folder="data"):
    return root / folder / "images_information" / "information.json"


def test_mossbench_fixture_and_missing_images(tmp_path, caplog):
    root = make_moss(tmp_path, missing_pid="2")
    with pytest.raises(MissingDataError, match=r"2 image files are missing.*moss-oversensitivity-2 \(.*data/images/2"
                                               r"\.png\).*moss-contrast-2 \(.*data_contrast/images/2\.png\)"):
        load_mossbench(root)
    report = LoadReport()
    with caplog.at_level(logging.WARNING):
        qs = load_mossbench(root, skip_missing=True, report=report)
    assert [q.id for q in qs] == ["moss-oversensitivity-1", "moss-oversensitivity-3", "moss-contrast-1",
                                  "moss-contrast-3"]
    assert [q.label for q in qs] == ["benign", "benign", "harmful", "harmful"]
    assert qs[0].image == root / "data" / "images" / "1.png" and qs[2].image == root / "data_contrast/images/1.png"
    assert qs[0].meta == {"over": "type 1", "human": 0, "harm": [7], "dataset": "mossbench", "source": "mossbench",
                          "kind": "image", "split": "oversensitivity", "pid": "1", "group": "mossbench-1"}
    assert qs[2].meta["group"] == "mossbench-1"  # a benign record and its harmful counterpart: one group
    assert report.loaded == 4 and report.skipped == ["moss-oversensitivity-2", "moss-contrast-2"]
    assert report.reasons["moss-contrast-2"].startswith("image not found:") and "data_contrast" in \
        report.reasons["moss-contrast-2"]
    assert "skipped 2" in caplog.text and "moss-oversensitivity-2" in caplog.text
    assert [q.id for q in load_mossbench(root, splits="contrast", skip_missing=True)] == ["moss-contrast-1",
                                                                                          "moss-contrast-3"]
    with pytest.raises(InputError, match="unknown MOSSBench split"):
        load_mossbench(root, splits=["benign"])


def test_mossbench_layout_errors(tmp_path):
    old = tmp_path / "old"
    (old / "oversensitivity").mkdir(parents=True)
    (old / "oversensitivity" / "information.json").write_text("{}")
    with pytest.raises(MissingDataError, match=r"data/images_information/information\.json.*older mechprobe"):
        load_mossbench(old)
    root = make_moss(tmp_path / "repo")
    with pytest.raises(MissingDataError, match="pass the repository root"):
        load_mossbench(root / "data")
    empty = make_moss(tmp_path / "empty", pids=("1",), missing_pid="1")
    with pytest.raises(DataError, match=r"no queries: .*empty"):
        load_mossbench(empty, skip_missing=True)


def _rewrite(path: Path, edit):
    recs = json.loads(path.read_text())
    edit(recs)
    path.write_text(json.dumps(recs, indent=1))


BAD_MOSS = {
    "invalid JSON": (lambda p: p.write_text('{\n "1": {"image": "images/1.png",}\n}'),
                     r": invalid JSON at line 2, column 32: Expecting property name"),
    "not UTF-8": (lambda p: p.write_bytes(b'{"1": {"question": "caf\xe9"}}'), r":1: not UTF-8 .*0xe9"),
    "top-level list": (lambda p: p.write_text('[{"pid": "1"}]'), "top level is a list; expected an object"),
    "record is a string": (lambda p: _rewrite(p, lambda r: r.update({"2": "images/2.png"})),
                           "record '2' is a string; expected an object"),
    "image null": (lambda p: _rewrite(p, lambda r: r["2"].update(image=None)), "record '2' has 'image' null"),
    "image a number": (lambda p: _rewrite(p, lambda r: r["2"].update(image=2)), r"record '2' has 'image' a number"),
    "image missing": (lambda p: _rewrite(p, lambda r: r["2"].pop("image")), "record '2' has no 'image' field"),
    "question missing": (lambda p: _rewrite(p, lambda r: r["2"].pop("question")), "record '2' has no 'question'"),
    "question a list": (lambda p: _rewrite(p, lambda r: r["2"].update(question=["a"])),
                        "record '2': 'question' must be a non-empty string, got a list"),
    "metadata a string": (lambda p: _rewrite(p, lambda r: r["2"].update(metadata="type 1")),
                          "record '2': 'metadata' must be an object, got a string"),
    "pid disagrees": (lambda p: _rewrite(p, lambda r: r["2"].update(pid="3")), "record '2' has \"pid\": '3'"),
    "repeated pid": (lambda p: p.write_text(p.read_text().replace('"3": {', '"2": {')),
                     "record '2' appears more than once"),
    "lone surrogate": (lambda p: _rewrite(p, lambda r: r["2"].update(question="bad \ud800")),
                       "record '2': query 'moss-oversensitivity-2'.*surrogate"),
}


@pytest.mark.parametrize("case", list(BAD_MOSS))
def test_mossbench_bad_files_name_file_and_record(tmp_path, case):
    root = make_moss(tmp_path)
    edit, match = BAD_MOSS[case]
    edit(moss_info(root))
    with pytest.raises(DataError, match=match) as err:
        load_mossbench(root, skip_missing=True)
    assert str(moss_info(root)) in str(err.value)
    assert not isinstance(err.value, MissingDataError)


@pytest.mark.skipif(not SHARED_MOSS.is_dir(), reason="needs ../shared/data/mossbench")
def test_real_mossbench_copy():
    report = LoadReport()
    qs = load_mossbench(SHARED_MOSS, skip_missing=True, report=report)
    assert sum(q.label == "benign" for q in qs) == 289 and sum(q.label == "harmful" for q in qs) == 235
    assert report.loaded == 524 and len(report.skipped) == 20 and "moss-oversensitivity-21" in report.skipped
    assert report.reasons["moss-contrast-247"].endswith("data_contrast/images/247.png")
    assert all(Path(q.image).is_file() for q in qs) and len({q.id for q in qs}) == 524
    assert {q.meta["over"] for q in qs} == {"type 1", "type 2", "type 3"}
    assert all(q.meta["dataset"] == "mossbench" and q.meta["kind"] == "image" for q in qs)
    contrast = {q.meta["pid"]: q for q in qs if q.label == "harmful"}
    benign = {q.meta["pid"]: q for q in qs if q.label == "benign"}
    shared = set(contrast) & set(benign)
    assert shared and all(Path(contrast[p].image).name == Path(benign[p].image).name for p in shared)
    assert all(contrast[p].meta["group"] == benign[p].meta["group"] == f"mossbench-{p}" for p in shared)
    assert len({q.meta["group"] for q in qs}) == len(set(contrast) | set(benign))
    with pytest.raises(MissingDataError, match=r"20 image files are missing.*moss-oversensitivity-21 "
                                               r"\(.*data/images/21\.png\).*and 10 more"):
        load_mossbench(SHARED_MOSS)


# --- MM-SafetyBench ----------------------------------------------------------------------------

def mmsb_record(s, i):
    return {"Question": f"{s} question {i}?", "GPT-Pred": "p", "Changed Question": "c", "Key Phrase": f"phrase {i}",
            "Phrase Type": "activity", "Rephrased Question": f"The image shows a phrase {i}.",
            "Rephrased Question(SD)": f"The image shows an activity {i}."}


def make_mmsb(root: Path, scenarios=("01-Illegal_Activitiy", "06-Fraud", "10-Legal_Opinion"), n=3, drop=(),
              images=None):
    """An MM-SafetyBench clone in the official layout, images under `images` (default data/imgs)."""
    qdir = root / "data" / "processed_questions"
    qdir.mkdir(parents=True)
    images = images or root / "data" / "imgs"
    for s in scenarios:
        recs = {str(i): mmsb_record(s, i) for i in range(n)}
        for i in range(n):
            for kind in ("SD", "SD_TYPO", "TYPO"):
                d = images / s / kind
                d.mkdir(parents=True, exist_ok=True)
                if (s, kind, str(i)) not in drop:
                    noise_image(i, size=(16, 16)).save(d / f"{i}.jpg")
        (qdir / f"{s}.json").write_text(json.dumps(recs, indent=1))
    (root / "TinyVersion_ID_List.json").write_text(json.dumps(
        [{"Scenario": s, "Sampled_ID_List": [0, 2]} for s in scenarios]))
    return root


def test_mmsafetybench_kinds_fields_and_filters(tmp_path):
    root = make_mmsb(tmp_path)
    assert [q.id for q in load_mmsafetybench(root)][:3] == [f"mmsb-01-Illegal_Activitiy-{i}-SD_TYPO" for i in range(3)]
    qs = load_mmsafetybench(root, kinds=("SD", "SD_TYPO", "TYPO", "TEXT"))
    assert len(qs) == 3 * 3 * 4 and all(q.label == "harmful" for q in qs)
    by = {q.id: q for q in qs}
    sd = by["mmsb-06-Fraud-1-SD"]
    assert sd.text == "The image shows an activity 1." and sd.image == root / "data/imgs/06-Fraud/SD/1.jpg"
    assert by["mmsb-06-Fraud-1-TYPO"].text == by["mmsb-06-Fraud-1-SD_TYPO"].text == "The image shows a phrase 1."
    text = by["mmsb-06-Fraud-1-text"]
    assert text.image is None and text.text == "06-Fraud question 1?" and text.meta["kind"] == "TEXT"
    assert sd.meta == {"dataset": "mmsafetybench", "source": "mmsafetybench", "scenario": "06-Fraud", "qid": "1",
                       "key_phrase": "phrase 1", "phrase_type": "activity", "own_criteria": False, "kind": "SD",
                       "group": "mmsb-06-Fraud-1"}
    # the four deliveries of a question are one group; questions (also of equal qid in another scenario) are not
    groups = {}
    for q in qs:
        groups.setdefault(q.meta["group"], set()).add(q.meta["kind"])
    assert len(groups) == 3 * 3 and all(kinds == {"SD", "SD_TYPO", "TYPO", "TEXT"} for kinds in groups.values())
    assert by["mmsb-10-Legal_Opinion-0-SD"].meta["own_criteria"] is True
    only = load_mmsafetybench(root, scenarios=["06-Fraud"], kinds=["TYPO"])
    assert [q.id for q in only] == [f"mmsb-06-Fraud-{i}-TYPO" for i in range(3)]
    for name in (6, "6", "06", "06-Fraud"):
        assert [q.id for q in load_mmsafetybench(root, scenarios=[name], kinds="TYPO")] == [q.id for q in only]
    kept = load_mmsafetybench(root, kinds="TEXT", own_criteria=False)
    assert {q.meta["scenario"] for q in kept} == {"01-Illegal_Activitiy", "06-Fraud"}


def test_mmsafetybench_subsets(tmp_path):
    root = make_mmsb(tmp_path)
    tiny = [q.id for q in load_mmsafetybench(root, kinds="TEXT", subset="tiny", scenarios=[1])]
    assert tiny == ["mmsb-01-Illegal_Activitiy-0-text", "mmsb-01-Illegal_Activitiy-2-text"]
    custom = tmp_path / "mine.json"
    custom.write_text(json.dumps([{"Scenario": "06-Fraud", "Sampled_ID_List": ["1"]}]))
    assert [q.id for q in load_mmsafetybench(root, kinds="TEXT", subset=custom)] == ["mmsb-06-Fraud-1-text"]
    assert [q.id for q in load_mmsafetybench(root, kinds="TEXT", subset={6: [0]})] == ["mmsb-06-Fraud-0-text"]
    assert load_tiny_subset(root / "TinyVersion_ID_List.json")["10-Legal_Opinion"] == {"0", "2"}
    with pytest.raises(MissingDataError, match="nope.json"):
        load_mmsafetybench(root, subset=tmp_path / "nope.json")
    custom.write_text(json.dumps([{"Scenario": "06-Fraud", "Sampled_ID_List": ["1"]}, {"Scenario": "6"}]))
    with pytest.raises(DataError, match=r"mine\.json: entry 1 is not an object with 'Scenario'"):
        load_mmsafetybench(root, subset=custom)
    custom.write_text(json.dumps({"06-Fraud": [1]}))
    with pytest.raises(DataError, match=r"mine\.json: the top level is an object; expected a list"):
        load_mmsafetybench(root, subset=custom)
    with pytest.raises(InputError, match="subset must be"):
        load_mmsafetybench(root, subset=3)


def test_mmsafetybench_text_alias_is_deprecated_and_keeps_ids(tmp_path):
    root = make_mmsb(tmp_path)
    with pytest.warns(DeprecationWarning, match='"text" is deprecated'):
        old = load_mmsafetybench(root, kinds=["text"])
    new = load_mmsafetybench(root, kinds=["TEXT"])
    assert [q.id for q in old] == [q.id for q in new] and old[0].id == "mmsb-01-Illegal_Activitiy-0-text"
    assert old[0].meta == new[0].meta


def test_mmsafetybench_names_and_missing_files(tmp_path, caplog):
    root = make_mmsb(tmp_path, drop=[("06-Fraud", "SD", str(i)) for i in range(3)])
    with pytest.raises(InputError, match=r"unknown MM-SafetyBench kind 'VIDEO'"):
        load_mmsafetybench(root, kinds=["VIDEO"])
    with pytest.raises(InputError, match=r"kind 'typo'.*did you mean 'TYPO'"):
        load_mmsafetybench(root, kinds=["typo"])
    with pytest.raises(InputError, match=r"'01-Illegal_Activity'; did you mean '01-Illegal_Activitiy'"):
        load_mmsafetybench(root, scenarios=["01-Illegal_Activity"])  # the official name keeps the typo
    with pytest.raises(InputError, match="scenario number 14"):
        load_mmsafetybench(root, scenarios=[14])
    with pytest.raises(MissingDataError, match=r"'02-HateSpeech' not found: .*02-HateSpeech\.json"):
        load_mmsafetybench(root, scenarios=[1, 2])
    with pytest.raises(MissingDataError, match="processed_questions"):
        load_mmsafetybench(tmp_path / "nowhere")
    with pytest.raises(MissingDataError, match="pass the repository root"):
        load_mmsafetybench(root / "data", kinds="TEXT")
    with pytest.raises(MissingDataError, match=r"image folder not found: .*elsewhere.*MM-SafetyBench\(imgs\)"):
        load_mmsafetybench(root, images=tmp_path / "elsewhere")
    with pytest.raises(MissingDataError, match=r"3 image files are missing.*06-Fraud/SD/0\.jpg"):
        load_mmsafetybench(root, kinds=["SD", "TYPO"])
    report = LoadReport()
    with caplog.at_level(logging.WARNING):
        qs = load_mmsafetybench(root, kinds=["SD", "TYPO"], skip_missing=True, report=report)
    assert len(qs) == 15 and report.loaded == 15 and report.skipped == [f"mmsb-06-Fraud-{i}-SD" for i in range(3)]
    assert report.reasons["mmsb-06-Fraud-2-SD"] == f"image not found: {root / 'data/imgs/06-Fraud/SD/2.jpg'}"
    assert "skipped 3" in caplog.text
    with pytest.raises(DataError, match=r"no queries: .*scenarios=\['06-Fraud'\], kinds=\['SD'\]"):
        load_mmsafetybench(root, kinds="SD", scenarios=["06-Fraud"], skip_missing=True)
    with pytest.raises(DataError, match="no queries: .*own_criteria=False"):
        load_mmsafetybench(root, kinds="TEXT", scenarios=[10], own_criteria=False)


def test_mmsafetybench_lists_first_ten_missing_images(tmp_path):
    root = make_mmsb(tmp_path, scenarios=("06-Fraud",), n=12, drop=[("06-Fraud", "SD", str(i)) for i in range(12)])
    with pytest.raises(MissingDataError, match="12 image files are missing") as err:
        load_mmsafetybench(root, kinds="SD")
    assert str(err.value).count(".jpg") == 10 and "and 2 more" in str(err.value)


def test_mmsafetybench_warns_about_misspelt_files(tmp_path, caplog):
    root = make_mmsb(tmp_path, scenarios=("06-Fraud",))
    qdir = root / "data" / "processed_questions"
    (qdir / "01-Illegal_Activity.json").write_text(json.dumps({"0": mmsb_record("x", 0)}))
    with caplog.at_level(logging.WARNING):
        qs = load_mmsafetybench(root, kinds="TEXT")
    assert {q.meta["scenario"] for q in qs} == {"06-Fraud"}
    assert "01-Illegal_Activity.json" in caplog.text and "did you mean '01-Illegal_Activitiy'" in caplog.text


def test_mmsafetybench_official_image_folder_name(tmp_path):
    root = make_mmsb(tmp_path / "repo", images=tmp_path / "downloads" / "MM-SafetyBench(imgs)")
    assert not (root / "data" / "imgs").exists()
    qs = load_mmsafetybench(root, images=tmp_path / "downloads" / "MM-SafetyBench(imgs)", kinds=["SD", "SD_TYPO"])
    assert len(qs) == 18 and qs[0].image == tmp_path / "downloads/MM-SafetyBench(imgs)/01-Illegal_Activitiy/SD/0.jpg"
    assert all(q.image.is_file() for q in qs)


BAD_MMSB = {
    "invalid JSON": (lambda p: p.write_text('{"0": {"Question": "a"\n  "Key Phrase": "b"}}'),
                     r": invalid JSON at line 2, column 3: Expecting ','"),
    "not UTF-8": (lambda p: p.write_bytes(b'{"0": {"Question": "\xff"}}'), r":1: not UTF-8"),
    "top-level list": (lambda p: p.write_text('[{"Question": "a"}]'), "top level is a list; expected an object"),
    "record is a string": (lambda p: _rewrite(p, lambda r: r.update({"1": "How?"})),
                           "record '1' is a string; expected an object"),
    "record is a list": (lambda p: _rewrite(p, lambda r: r.update({"1": ["How?"]})), "record '1' is a list"),
    "text field missing": (lambda p: _rewrite(p, lambda r: r["1"].pop("Rephrased Question")),
                           "record '1' has no 'Rephrased Question' field"),
    "text field null": (lambda p: _rewrite(p, lambda r: r["1"].update({"Rephrased Question": None})),
                        "record '1': 'Rephrased Question' must be a non-empty string, got null"),
    "key phrase a number": (lambda p: _rewrite(p, lambda r: r["1"].update({"Key Phrase": 3})),
                            r"record '1': 'Key Phrase' must be a string, got a number"),
    "repeated id": (lambda p: p.write_text(p.read_text().replace('"2": {', '"1": {')),
                    "record '1' appears more than once"),
    "repeated field": (lambda p: p.write_text(p.read_text().replace('"GPT-Pred"', '"Question"')),
                       "record '0' has the field 'Question' more than once"),
}


@pytest.mark.parametrize("case", list(BAD_MMSB))
def test_mmsafetybench_bad_files_name_file_and_record(tmp_path, case):
    root = make_mmsb(tmp_path)
    path = root / "data" / "processed_questions" / "06-Fraud.json"
    edit, match = BAD_MMSB[case]
    edit(path)
    with pytest.raises(DataError, match=match) as err:
        load_mmsafetybench(root, kinds=("TYPO", "TEXT"))
    assert str(path) in str(err.value) and not isinstance(err.value, MissingDataError)


@pytest.mark.skipif(not SHARED_MMSB.is_dir(), reason="needs ../shared/data/mm-safetybench")
def test_real_mmsafetybench_copy(tmp_path):
    tiny = json.loads((SHARED_MMSB / "TinyVersion_ID_List.json").read_text())
    on_disk = [(e["Scenario"], str(i)) for e in tiny for i in e["Sampled_ID_List"]
               if (SHARED_MMSB / "data/imgs" / e["Scenario"] / "SD_TYPO" / f"{i}.jpg").is_file()]
    report = LoadReport()
    qs = load_mmsafetybench(SHARED_MMSB, kinds=["SD_TYPO"], subset="tiny", skip_missing=True, report=report)
    assert [(q.meta["scenario"], q.meta["qid"]) for q in qs] == on_disk and len(qs) > 0
    assert report.loaded + len(report.skipped) == sum(len(e["Sampled_ID_List"]) for e in tiny)
    assert all(q.text and q.meta["key_phrase"] for q in qs)
    texts = load_mmsafetybench(SHARED_MMSB, kinds=["TEXT"])
    assert len(texts) == sum(MMSB_FILES.values()) == 1680 and len({q.id for q in texts}) == 1680
    assert {q.meta["scenario"] for q in texts if q.meta["own_criteria"]} == set(OWN)
    kept = load_mmsafetybench(SHARED_MMSB, kinds=["TEXT"], own_criteria=False)
    assert len(kept) == sum(n for s, n in MMSB_FILES.items() if s not in OWN)
    assert len(load_mmsafetybench(SHARED_MMSB, kinds="TEXT", scenarios=[3, "04"])) == 44 + 144
    with pytest.raises(InputError, match="did you mean '05-EconomicHarm'"):
        load_mmsafetybench(SHARED_MMSB, kinds="TEXT", scenarios=["05-Economic_Harm"])
    # the official download's folder name, outside the repository
    imgs = tmp_path / "MM-SafetyBench(imgs)"
    shutil.copytree(SHARED_MMSB / "data/imgs/02-HateSpeech", imgs / "02-HateSpeech")
    copied = load_mmsafetybench(SHARED_MMSB, images=imgs, scenarios=[2], subset="tiny", kinds=["SD", "TYPO"])
    assert len(copied) == 2 * sum(s == "02-HateSpeech" for s, _ in on_disk)
    assert all(q.image.parent.parent.parent == imgs and q.image.is_file() for q in copied)


# --- JSONL -------------------------------------------------------------------------------------

def write_lines(path: Path, *lines) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n",
                    encoding="utf-8")
    return path


def test_jsonl_fields_and_relative_images(tmp_path):
    (tmp_path / "img").mkdir()
    noise_image(0, size=(8, 8)).save(tmp_path / "img" / "a.png")
    f = write_lines(tmp_path / "q.jsonl", {"id": 7, "text": "hi", "image": "img/a.png", "label": "harmful"}, "",
                    {"id": "b", "text": None, "image": "img/./a.png", "meta": None},
                    {"id": "c", "text": "x", "image": None, "label": None, "meta": {"k": [1]}},
                    json.dumps({"id": "d", "text": "line\u2028separator"}, ensure_ascii=False))
    qs = load_jsonl(f)
    assert [q.id for q in qs] == ["7", "b", "c", "d"] and qs[0].image == tmp_path / "img" / "a.png"
    assert qs[3].text == "line\u2028separator"  # a Unicode line separator inside a string is not a new line
    assert qs[1].text == "" and qs[1].meta == {} and qs[2].meta == {"k": [1]} and qs[2].image is None
    save_jsonl(qs, tmp_path / "back.jsonl")
    assert json.loads((tmp_path / "back.jsonl").read_text().splitlines()[0])["image"] == "img/a.png"
    assert [(q.id, q.image) for q in load_jsonl(tmp_path / "back.jsonl")] == [(q.id, q.image) for q in qs]


def test_jsonl_group_field_becomes_meta_group(tmp_path):
    f = write_lines(tmp_path / "q.jsonl", {"id": "q3-text", "text": "How do I x?", "group": "q3"},
                    {"id": "q3-again", "text": "Tell me how to x.", "group": "q3", "meta": {"group": "q3", "k": 1}},
                    {"id": "q4", "text": "y", "meta": {"group": 4}}, {"id": "q5", "text": "z"})
    qs = load_jsonl(f)
    assert [q.meta.get("group") for q in qs] == ["q3", "q3", 4, None] and qs[1].meta["k"] == 1
    save_jsonl(qs, tmp_path / "back.jsonl")  # written inside meta, read back the same
    assert [q.meta for q in load_jsonl(tmp_path / "back.jsonl")] == [q.meta for q in qs]


BAD_JSONL = {
    "id null": ({"id": None, "text": "a"}, ":2: 'id' must be a non-empty string or an integer, got null"),
    "id empty": ({"id": " ", "text": "a"}, ":2: 'id' must be .*got an empty string"),
    "id a list": ({"id": [1], "text": "a"}, ":2: 'id' must be .*got a list"),
    "id a boolean": ({"id": True, "text": "a"}, ":2: 'id' must be .*got a boolean"),
    "id a float": ({"id": 1.5, "text": "a"}, r":2: 'id' must be .*got a number \(1\.5\)"),
    "text a number": ({"id": "x", "text": 0}, r":2: 'text' must be a string, got a number \(0\)"),
    "text a list": ({"id": "x", "text": ["a"]}, ":2: 'text' must be a string, got a list"),
    "label unknown": ({"id": "x", "text": "a", "label": "bad"}, ":2: 'label' must be one of"),
    "meta a list": ({"id": "x", "text": "a", "meta": [1]}, ":2: 'meta' must be an object, got a list"),
    "image a number": ({"id": "x", "text": "a", "image": 3}, r":2: 'image' must be a file path .*got a number"),
    "image a list": ({"id": "x", "text": "a", "image": ["a.png"]}, ":2: 'image' must be a file path .*got a list"),
    "image empty": ({"id": "x", "text": "a", "image": ""}, ":2: 'image' must be .*got an empty string"),
    "no text, no image": ({"id": "x", "text": ""}, ":2: query 'x' has neither text nor image"),
    "lone surrogate": ('{"id": "x", "text": "a\\ud800b"}', ":2: query 'x': text has an invalid character"),
    "not an object": ('["x", "a"]', ":2: each line must be an object with an 'id'"),
    "no id": ({"text": "a"}, ":2: each line must be an object with an 'id'"),
    "unknown field": ({"id": "x", "txt": "a"}, r":2: unknown fields \['txt'\]"),
    "invalid JSON": ('{"id": "x", "text": "a"', ":2: not valid JSON: .*column"),
    "repeated field": ('{"id": "x", "text": "a", "text": "b"}', ":2: the field 'text' appears twice"),
    "duplicate id": ({"id": 1, "text": "b"}, r":2: duplicate id '1' \(first on line 1\)"),
    "group a list": ({"id": "x", "text": "a", "group": ["g"]}, ":2: 'group' must be a non-empty string or an "
                                                               "integer, got a list"),
    "group empty": ({"id": "x", "text": "a", "group": " "}, ":2: 'group' must be .*got an empty string"),
    "group a boolean": ({"id": "x", "text": "a", "group": True}, ":2: 'group' must be .*got a boolean"),
    "group against meta": ({"id": "x", "text": "a", "group": "g", "meta": {"group": "h"}},
                           ":2: 'group' is 'g' but 'meta' has group 'h'"),
    "meta group a float": ({"id": "x", "text": "a", "meta": {"group": 1.5}},
                           r":2: query 'x': meta\['group'\] .*must be a non-empty string or an integer, got float"),
    "outside folder": ({"id": "x", "image": "../a.png"}, r":2: image path '../a.png' is outside .*allow_outside"),
}


@pytest.mark.parametrize("case", list(BAD_JSONL))
def test_jsonl_bad_lines_name_file_and_line(tmp_path, case):
    line, match = BAD_JSONL[case]
    f = write_lines(tmp_path / "q.jsonl", {"id": "1", "text": "fine"}, line)
    with pytest.raises(DataError, match=match) as err:
        load_jsonl(f)
    assert str(err.value).startswith(f"{f}:2: ")
    assert isinstance(err.value, QueryError)  # what earlier versions raised


def test_jsonl_encoding_paths_and_missing_images(tmp_path):
    f = tmp_path / "data" / "q.jsonl"
    f.parent.mkdir()
    f.write_bytes(b'{"id": "1", "text": "ok"}\n{"id": "2", "text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"q\.jsonl:2: not UTF-8 .*0xe9 at column 25"):
        load_jsonl(f)
    outside = tmp_path / "a.png"
    noise_image(1, size=(8, 8)).save(outside)
    write_lines(f, {"id": "1", "image": str(outside)})
    with pytest.raises(DataError, match="is outside the dataset's folder"):
        load_jsonl(f)
    assert load_jsonl(f, allow_outside=True)[0].image == outside
    write_lines(f, {"id": "1", "image": "../a.png"}, {"id": "2", "image": "gone.png"}, {"id": "3", "text": "t"})
    with pytest.raises(MissingDataError, match=r"q\.jsonl: 1 image files are missing.*line 2 \(.*gone\.png\)"):
        load_jsonl(f, allow_outside=True)
    report = LoadReport()
    assert [q.id for q in load_jsonl(f, allow_outside=True, skip_missing=True, report=report)] == ["1", "3"]
    assert report.skipped == ["2"] and report.reasons["2"].startswith(f"{f}:2: image not found")
    write_lines(f, "", "  ")
    with pytest.raises(DataError, match=r"q\.jsonl: no queries"):
        load_jsonl(f)
    with pytest.raises(MissingDataError, match="nope.jsonl"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_one_report_adds_up_loaders_and_ids_are_unique(tmp_path):
    from probing.datasets._common import UniqueIds

    moss = make_moss(tmp_path / "moss", missing_pid="3")
    mmsb = make_mmsb(tmp_path / "mmsb", scenarios=("06-Fraud",), drop=[("06-Fraud", "SD_TYPO", "0")])
    report = LoadReport()
    load_mossbench(moss, skip_missing=True, report=report)
    load_mmsafetybench(mmsb, skip_missing=True, report=report)
    assert report.loaded == 4 + 2 and report.skipped == ["moss-oversensitivity-3", "moss-contrast-3",
                                                         "mmsb-06-Fraud-0-SD_TYPO"]
    ids = UniqueIds()
    ids.add("a", "f.json record '1'")
    with pytest.raises(DataError, match=r"duplicate query id 'a': f\.json record '1' and g\.json record '2'"):
        ids.add("a", "g.json record '2'")


# --- option types --------------------------------------------------------------------------------

def test_on_off_options_must_be_booleans(tmp_path):
    """A string "false" (a TOML or JSON typo) would count as true and keep what the user dropped:
    every loader, and a study config's [[datasets]] table, refuses it naming the option."""
    from experiments import study_config

    make_moss(tmp_path / "moss")
    make_mmsb(tmp_path / "mmsb")
    (tmp_path / "q.jsonl").write_text('{"id": "a", "text": "hi", "label": "benign"}\n')
    cases = [(lambda: load_mossbench(tmp_path / "moss", skip_missing="false"), "MOSSBench: option 'skip_missing'"),
             (lambda: load_mmsafetybench(tmp_path / "mmsb", kinds=["TEXT"], own_criteria="false"),
              "MM-SafetyBench: option 'own_criteria'"),
             (lambda: load_mmsafetybench(tmp_path / "mmsb", kinds=["TEXT"], skip_missing=0), "option 'skip_missing'"),
             (lambda: load_mmsafetybench(tmp_path / "mmsb", kinds=5), "option 'kinds' must be a name or a list"),
             (lambda: load_mossbench(tmp_path / "moss", splits=[None]), "option 'splits'"),
             (lambda: load_jsonl(tmp_path / "q.jsonl", skip_missing="no"), "JSONL: option 'skip_missing'")]
    for call, match in cases:
        with pytest.raises(InputError, match=re.escape(match)):
            call()
    with pytest.raises(InputError, match=re.escape("[[datasets]] 'mmsafetybench': 'own_criteria' must be true or false")):
        study_config.build({"datasets": [{"name": "mmsafetybench", "root": str(tmp_path / "mmsb"),
                                          "own_criteria": "false"}]}, "cfg.toml")
    assert len(load_mmsafetybench(tmp_path / "mmsb", kinds="TEXT", own_criteria=False)) < \
        len(load_mmsafetybench(tmp_path / "mmsb", kinds="TEXT", own_criteria=True))


@pytest.mark.skipif(not SHARED_MMSB.is_dir(), reason="needs ../shared/data/mm-safetybench")
def test_mmsafetybench_spec_means_the_same_in_every_command():
    """`--dataset mmsafetybench:DIR` is the official tiny subset (SD_TYPO, present images) in the
    study and in the Session experiments alike (they once read 1680 and 168 questions)."""
    from experiments.common import load_queries
    from experiments.study import load_dataset
    from experiments.study_config import parse_dataset_flag

    spec = f"mmsafetybench:{SHARED_MMSB}"
    session = load_queries(spec)
    study, _ = load_dataset({**parse_dataset_flag(spec), "tag": "mmsafetybench"})
    assert [q.id for q in session] == [q.id for q in study]
    assert [q.id for q in session] == [q.id for q in load_mmsafetybench(SHARED_MMSB, subset="tiny", skip_missing=True)]


@pytest.mark.skipif(not SHARED_MOSS.is_dir(), reason="needs ../shared/data/mossbench")
def test_limit_means_the_same_in_every_command():
    """`--limit N` is the first N of each dataset, stratified by label, in the Session experiments as
    in the study: MOSSBench lists its benign records first, so a plain head held no harmful query
    and `mechprobe mechanisms --dataset mossbench:DIR --limit 20` stopped where `study` ran."""
    from experiments.common import load_queries
    from experiments.study import load_dataset
    from experiments.study_config import parse_dataset_flag

    spec = f"mossbench:{SHARED_MOSS}"
    session = load_queries(spec, 20)
    study, _ = load_dataset({**parse_dataset_flag(spec), "tag": "mossbench", "limit": 20})
    assert [q.id for q in session] == [q.id for q in study]
    assert {q.label for q in session} == {"harmful", "benign"} and len(session) == 20
    both = load_queries(f"{spec},toy", 6)  # each spec limited, not their concatenation
    assert len(both) == 12 and {q.label for q in both[6:]} == {"harmful", "benign"}
