"""Run directories: nothing lost, nothing silently wrong (issue 12).

Every test drives `RunDir` with a fake scorer that records what it is asked to score, so a
recomputation shows up as a call and nothing here needs a model."""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from probing import Query, ScoreTable
from probing.errors import RunDirError, ScoringError
from experiments.runs import LOCK, RunDir

FP = {"model": "m", "readout": "first_token"}


class Scorer:
    """Scores a query as the length of its text (NaN for ids in ``nan``); records each call."""

    def __init__(self, nan=()):
        self.calls, self.nan = [], set(nan)

    def __call__(self, chunk):
        self.calls.append([q.id for q in chunk])
        margin = torch.tensor([float("nan") if q.id in self.nan else float(len(q.text)) for q in chunk])
        return ScoreTable([q.id for q in chunk], [q.label for q in chunk], margin, margin[:, None].clone(), [0])


def queries(texts=None):
    texts = texts or {}
    return [Query(f"q{i}", texts.get(f"q{i}", f"text {i}"), label="harmful" if i % 2 else "benign") for i in range(6)]


def run_once(path, qs, condition="c", scorer=None, fingerprint=FP, cond_fp=None, **kw):
    scorer = scorer or Scorer()
    with RunDir(path, {"x": 1}, fingerprint=fingerprint, **kw) as run:
        table = run.score(scorer, qs, condition, batch=2, fingerprint=cond_fp)
    return table, scorer.calls


def test_resume_scores_nothing_and_gives_the_same_table(tmp_path):
    first, calls = run_once(tmp_path / "r", queries())
    assert calls == [["q0", "q1"], ["q2", "q3"], ["q4", "q5"]]
    again, calls = run_once(tmp_path / "r", queries())
    assert calls == [] and torch.equal(first.margin, again.margin)


def test_changed_text_under_the_same_id_recomputes_only_its_shard(tmp_path, caplog):
    run_once(tmp_path / "r", queries())
    changed = queries({"q3": "a different request"})
    with caplog.at_level(logging.WARNING):
        table, calls = run_once(tmp_path / "r", changed)
    assert calls == [["q2", "q3"]]
    assert table.margin[3].item() == len("a different request")
    assert "shards/c/00001" in caplog.text and "q3" in caplog.text


def test_changed_image_or_label_recomputes(tmp_path):
    from PIL import Image

    img = tmp_path / "a.png"
    Image.new("RGB", (8, 8), "red").save(img)
    qs = [Query("a", "t", image=str(img), label="benign"), Query("b", "u", label="harmful")]
    run_once(tmp_path / "r", qs)
    Image.new("RGB", (9, 9), "blue").save(img)  # same path, other bytes (size changes)
    _, calls = run_once(tmp_path / "r", qs)
    assert calls == [["b", "a"]]  # one shard (text-only query first)
    relabelled = [qs[0], Query("b", "u", label="benign")]
    _, calls = run_once(tmp_path / "r", relabelled)
    assert calls == [["b", "a"]]


def test_flipped_byte_in_a_shard_is_recomputed(tmp_path, caplog):
    first, _ = run_once(tmp_path / "r", queries())
    f = tmp_path / "r" / "shards" / "c" / "00002" / "scores.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x01  # a bit of the stored margins: still a loadable file
    f.write_bytes(bytes(data))
    assert ScoreTable.load(f.parent) is not None  # loads fine: only the checksum tells
    with caplog.at_level(logging.WARNING):
        again, calls = run_once(tmp_path / "r", queries())
    assert calls == [["q4", "q5"]] and torch.equal(first.margin, again.margin)
    assert "00002" in caplog.text and "checksum" in caplog.text


def test_shard_copied_from_another_condition_is_recomputed(tmp_path, caplog):
    run_once(tmp_path / "r", queries(), condition="a")
    run_once(tmp_path / "r", queries(), condition="b")
    shutil.rmtree(tmp_path / "r" / "shards" / "b" / "00001")
    shutil.copytree(tmp_path / "r" / "shards" / "a" / "00001", tmp_path / "r" / "shards" / "b" / "00001")
    with caplog.at_level(logging.WARNING):
        _, calls = run_once(tmp_path / "r", queries(), condition="b")
    assert calls == [["q2", "q3"]] and "condition 'a'" in caplog.text


def test_changed_condition_parameters_recompute(tmp_path):
    run_once(tmp_path / "r", queries(), cond_fp={"defense": {"params": {"k": 1}}})
    _, calls = run_once(tmp_path / "r", queries(), cond_fp={"defense": {"params": {"k": 1}}})
    assert calls == []
    _, calls = run_once(tmp_path / "r", queries(), cond_fp={"defense": {"params": {"k": 2}}})
    assert len(calls) == 3


def test_readout_changed_after_config_json_was_deleted(tmp_path, caplog):
    run_once(tmp_path / "r", queries())
    (tmp_path / "r" / "config.json").unlink()
    with caplog.at_level(logging.WARNING):
        _, calls = run_once(tmp_path / "r", queries(), fingerprint={**FP, "readout": "yes_no"})
    assert len(calls) == 3 and "another readout" in caplog.text


def test_other_fingerprint_is_refused_but_analysis_options_and_out_spelling_are_not(tmp_path, monkeypatch):
    run_once(tmp_path / "r", queries())
    with pytest.raises(RunDirError, match=r"another config.*readout"):
        RunDir(tmp_path / "r", {"x": 1}, fingerprint={**FP, "readout": "yes_no"})
    monkeypatch.chdir(tmp_path)
    with RunDir("r", {"x": 2, "n_boot": 7}, fingerprint=FP) as run:  # relative path, other options
        assert run.score(Scorer(), queries(), "c", batch=2) is not None


def test_nan_scores_are_an_error_naming_shard_and_query(tmp_path):
    with pytest.raises(ScoringError, match=r"shards/c/00001.*'q3'"):
        run_once(tmp_path / "r", queries(), scorer=Scorer(nan={"q3"}))
    assert not (tmp_path / "r" / "shards" / "c" / "00001").exists()  # nothing saved for it
    # a stored shard holding NaN (checksum fine: the model produced it) is an error too, not a silent table
    with RunDir(tmp_path / "r", {"x": 1}, fingerprint=FP) as run:
        expect = {"condition": "c", "condition_fingerprint": {}, "fingerprint": FP,
                  "queries": [[q.id, __import__("experiments.runs").runs.query_digest(q)] for q in queries()[2:4]]}
        nan = ScoreTable(["q2", "q3"], ["benign", "harmful"], torch.tensor([1.0, float("nan")]),
                         torch.zeros(2, 1), [0])
        run._save_shard(tmp_path / "r" / "shards" / "c" / "00001", nan, expect)
    with pytest.raises(ScoringError, match=r"00001.*'q3'"):
        run_once(tmp_path / "r", queries())


def test_nan_found_by_the_scorer_itself_still_names_the_shard(tmp_path):
    """`RefusalScorer` checks its own tables (a ScoringError naming the call and queries, before
    the shard check sees them): the run directory adds the shard and condition to its message."""
    inner = Scorer(nan={"q3"})

    def checking(chunk):
        table = inner(chunk)
        table.check_finite("scoring")  # as the real scorer does when it finishes a table
        return table

    with pytest.raises(ScoringError, match=r"shards/c/00001 \(condition 'c'\): scoring: .*'q3'"):
        run_once(tmp_path / "r", queries(), scorer=checking)
    assert not (tmp_path / "r" / "shards" / "c" / "00001").exists()


def test_overwrite_refuses_a_foreign_directory_and_deletes_nothing(tmp_path):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("years of work")
    (thesis / "figures").mkdir()
    (thesis / "figures" / "f.pdf").write_bytes(b"%PDF")
    before = sorted(p.relative_to(thesis) for p in thesis.rglob("*"))
    for overwrite in (True, False):
        with pytest.raises(RunDirError, match=r"thesis.*not a mechprobe run.*chapter1.tex"):
            RunDir(thesis, {"x": 1}, overwrite=overwrite)
    assert sorted(p.relative_to(thesis) for p in thesis.rglob("*")) == before
    with pytest.raises(RunDirError, match="is a file"):
        RunDir(thesis / "chapter1.tex", {"x": 1}, overwrite=True)


def test_overwrite_clears_a_mechprobe_run_and_an_empty_directory(tmp_path):
    run_once(tmp_path / "r", queries())
    _, calls = run_once(tmp_path / "r", queries(), fingerprint={**FP, "readout": "yes_no"}, overwrite=True)
    assert len(calls) == 3
    (tmp_path / "empty").mkdir()
    run_once(tmp_path / "empty", queries(), overwrite=True)
    assert json.loads((tmp_path / "empty" / "config.json").read_text())["mechprobe-run"] == 2


def test_damaged_config_json_names_the_file(tmp_path):
    run_once(tmp_path / "r", queries())
    cfg = tmp_path / "r" / "config.json"
    cfg.write_text(cfg.read_text()[:25])  # truncated
    with pytest.raises(RunDirError, match=r"config\.json is damaged.*delete that file.*--overwrite"):
        RunDir(tmp_path / "r", {"x": 1}, fingerprint=FP)
    _, calls = run_once(tmp_path / "r", queries(), overwrite=True)
    assert len(calls) == 3
    leftovers = [p.name for p in (tmp_path / "r").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []  # config.json is written through a temporary file and a rename


def test_second_writer_is_refused_until_the_first_closes(tmp_path):
    first = RunDir(tmp_path / "r", {"x": 1}, fingerprint=FP)
    with pytest.raises(RunDirError, match=r"this process already has the run in .* open \(a Study or Session not "
                                          r"closed: call its close\(\)"):
        RunDir(tmp_path / "r", {"x": 1}, fingerprint=FP)
    first.score(Scorer(), queries(), "c", batch=2)  # the first writer is unaffected
    first.close()
    assert not (tmp_path / "r" / LOCK).exists()
    with RunDir(tmp_path / "r", {"x": 1}, fingerprint=FP):
        assert (tmp_path / "r" / LOCK).exists()


def test_second_writer_in_another_process_is_refused(tmp_path):
    code = ("import sys; from experiments.runs import RunDir\n"
            "try:\n    RunDir(sys.argv[1], {'x': 1}, fingerprint={'model': 'm', 'readout': 'first_token'})\n"
            "except Exception as e:\n    print(type(e).__name__, e); sys.exit(3)\n")
    with RunDir(tmp_path / "r", {"x": 1}, fingerprint=FP):
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r")], capture_output=True, text=True,
                             timeout=120, cwd=os.getcwd())
    assert out.returncode == 3 and "RunDirError another mechprobe process" in out.stdout, out.stderr[-2000:]


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    run_once(tmp_path / "r", queries())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "r" / LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "time": 0}))
    with caplog.at_level(logging.WARNING):
        _, calls = run_once(tmp_path / "r", queries())
    assert calls == [] and "stale lock" in caplog.text and str(dead.pid) in caplog.text
    assert not (tmp_path / "r" / LOCK).exists()


def test_lock_of_a_live_process_on_another_host_is_respected(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere", "time": 0}))
    with pytest.raises(RunDirError, match="pid 1 on elsewhere"):
        RunDir(tmp_path / "r", {"x": 1})


def test_shards_group_text_only_and_image_queries_and_tables_keep_input_order(tmp_path):
    from PIL import Image

    img = Image.new("RGB", (8, 8), "red")
    qs = [Query(f"q{i}", f"text {i}", image=img if i % 2 else None, label="harmful" if i % 3 else "benign")
          for i in range(6)]
    table, calls = run_once(tmp_path / "r", qs)
    assert calls == [["q0", "q2"], ["q4", "q1"], ["q3", "q5"]]  # text-only first, then image queries
    assert table.ids == [q.id for q in qs]
    assert table.margin.tolist() == [float(len(q.text)) for q in qs]
    again, calls = run_once(tmp_path / "r", qs)
    assert calls == [] and again.ids == table.ids


def test_a_large_checkpoint_retrained_in_place_changes_the_model_fingerprint(tmp_path, monkeypatch):
    """Weight files above HASH_WEIGHTS_BELOW are not hashed; one rewritten with the same name and
    size (a fine-tune saved into the same folder) must still give another fingerprint."""
    from probing import model as model_mod
    from probing.model import model_fingerprint, resolve_model

    ckpt = tmp_path / "ckpt"
    shutil.copytree(resolve_model("toy")[1], ckpt)
    monkeypatch.setattr(model_mod, "HASH_WEIGHTS_BELOW", 0)
    before = model_fingerprint(ckpt)
    assert model_fingerprint(ckpt) == before  # stable while nothing changes
    weights = next(ckpt.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # same name, same size, other weights
    st = weights.stat()
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert weights.stat().st_size == st.st_size
    assert model_fingerprint(ckpt)["weights"] != before["weights"]
