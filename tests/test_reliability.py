"""Bad inputs fail before any forward pass, in one line; loading leaves nothing behind (issue 12)."""

import json
import random
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from experiments.cli import main
from probing.errors import DataError
from probing.score_table import ScoreTable

FAST = ["--n-boot", "20", "--batch-size", "2"]


def write_jsonl(path: Path, texts: dict[str, str] | None = None, labels=("benign", "harmful")) -> Path:
    texts = texts or {}
    rows = [{"id": f"q{i}", "text": texts.get(f"q{i}", f"Please explain topic number {i}."),
             "label": labels[i % len(labels)]} for i in range(6)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def scored(monkeypatch):
    """Records (condition, ids) of every chunk the scorer is asked for."""
    from probing import scorer as scorer_mod

    real, seen = scorer_mod.RefusalScorer.score, []

    def spy(self, queries, **kw):
        queries = list(queries)
        condition = (kw.get("meta") or {}).get("condition")
        if condition is not None:  # not the inner calls a defense's plan makes
            seen.append((condition, [q.id for q in queries]))
        return real(self, queries, **kw)

    monkeypatch.setattr(scorer_mod.RefusalScorer, "score", spy)
    return seen


def test_changed_texts_recompute_only_their_shards_and_out_spelling_does_not_matter(tmp_path, monkeypatch, scored):
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "q.jsonl")
    args = ["mechanisms", "--dataset", f"jsonl:{data}", *FAST]
    assert main([*args, "--defenses", "sr_self_reminder", "--out", "run"]) == 0  # relative --out
    first = json.loads((tmp_path / "run" / "tables" / "mechanisms.json").read_text())
    assert len(scored) == 6
    scored.clear()
    write_jsonl(data, {"q3": "A completely different request about topic three."})
    # absolute --out, another --n-boot, one more defense: the same run, resumed
    assert main([*args, "--n-boot", "30", "--defenses", "sr_self_reminder,sr_mmsafety",
                 "--out", str(tmp_path / "run")]) == 0
    assert sorted(scored) == sorted([("baseline", ["q2", "q3"]), ("sr_self_reminder", ["q2", "q3"]),
                                     ("sr_mmsafety", ["q0", "q1"]), ("sr_mmsafety", ["q2", "q3"]),
                                     ("sr_mmsafety", ["q4", "q5"])])
    second = json.loads((tmp_path / "run" / "tables" / "mechanisms.json").read_text())
    assert second[0]["mean_shift"] != first[0]["mean_shift"]  # the changed query is in the tables


def test_misspelt_defense_fails_before_any_forward(tmp_path, capsys, no_forward):
    assert main(["mechanisms", "--defenses", "sr_self_reminder,qr_captoin", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "did you mean 'qr_caption'" in err and "--defenses" in err
    assert not (tmp_path / "o").exists()  # nothing written either


def test_one_class_dataset_fails_before_scoring(tmp_path, capsys, no_forward):
    data = write_jsonl(tmp_path / "q.jsonl", labels=("harmful",))
    assert main(["mechanisms", "--dataset", f"jsonl:{data}", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no benign queries" in err and "q.jsonl" in err


def test_duplicate_ids_across_concatenated_datasets_name_both(tmp_path, capsys, no_forward):
    a = write_jsonl(tmp_path / "a.jsonl")
    b = write_jsonl(tmp_path / "b.jsonl")
    assert main(["mechanisms", "--dataset", f"jsonl:{a},jsonl:{b}", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "'q0' appears twice" in err and "a.jsonl record 1" in err and "b.jsonl record 1" in err
    from experiments.common import load_queries

    with pytest.raises(DataError, match="appears twice"):
        load_queries(f"jsonl:{a},jsonl:{b}")


@pytest.mark.parametrize("value", ["0", "-5", "x"])
def test_limit_must_be_at_least_one(value, capsys):
    with pytest.raises(SystemExit) as e:
        main(["mechanisms", "--limit", value])
    assert e.value.code == 2 and "--limit" in capsys.readouterr().err


def test_unknown_model_fails_fast_offline_in_one_line(tmp_path, capsys, monkeypatch):
    from probing import model as model_mod

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name, hint in [("llava-hf/no-such-model", "local Hugging Face cache"), ("tiny_random", "did you mean"),
                       ("./no/such/dir", "no such directory")]:
        start = time.perf_counter()
        assert main(["mechanisms", "--model", name, "--out", str(tmp_path / "o")]) == 2
        assert time.perf_counter() - start < 5
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and name in err and hint in err
    # no offline flag, but no network: one probe, no retries
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(model_mod, "_offline", lambda: False)
    monkeypatch.setattr(model_mod, "_hub_reachable", lambda timeout=3.0: False)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="cannot be reached"):
        model_mod.load_model("llava-hf/no-such-model")
    assert time.perf_counter() - start < 5
    assert not (tmp_path / "o").exists()


def test_loading_leaves_no_files_in_tmp_and_no_rng_changed(tmp_path, monkeypatch):
    from probing import load_model

    tmp, cache = tmp_path / "tmp", tmp_path / "cache"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setenv("MECHPROBE_CACHE", str(cache))
    torch.manual_seed(123)
    random.seed(123)
    state, py_state = torch.random.get_rng_state(), random.getstate()
    a = load_model("tiny-random")
    b = load_model("tiny-random")
    assert list(tmp.iterdir()) == []  # nothing in the temp dir ...
    assert a.source_dir == b.source_dir and len(list(cache.iterdir())) == 1  # ... one cached folder, reused
    assert (a.source_dir / "preprocessor_config.json").is_file()
    assert torch.equal(torch.random.get_rng_state(), state) and random.getstate() == py_state


def test_mo_finetune_changes_no_global_rng_and_caches_per_model(monkeypatch):
    from defenses import get_defense
    from probing import load_model

    toy = load_model("toy")
    torch.manual_seed(7)
    state = torch.random.get_rng_state()
    d = get_defense("mo_finetune", steps=2, batch_size=4)
    tuned = d.model(toy)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert d.model(toy) is tuned  # cached for this model object ...
    assert type(d._cache).__name__ == "WeakKeyDictionary"  # ... weakly: a new model never gets a stale entry


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path):
    from benchmarks.bad_inputs import interrupt_after_first_shard

    out = tmp_path / "run"
    proc, err, running = interrupt_after_first_shard(out)
    assert running, err[-2000:]
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1].split("\r")[-1] == "interrupted: rerun the same command to resume"
    assert "Traceback" not in err
    assert not (out / ".lock").exists()  # the lock was released


def test_a_ctrl_c_swallowed_by_a_finalizer_is_raised_again_at_the_next_shard(tmp_path, monkeypatch):
    """Python only reports ("Exception ignored") a KeyboardInterrupt raised inside a finalizer
    (tqdm's ``__del__`` once let a run go on and exit 0 in CI). Under the CLI's SIGINT handler
    (`experiments.interrupts.remembered`) the interrupt is remembered, silenced there, and raised
    again before the next shard is scored; outside it nothing changes."""
    import signal

    from experiments import interrupts
    from experiments.runs import RunDir
    from probing import Query

    reported = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: reported.append(u.exc_type))

    class Finalized:
        def __del__(self):  # as if SIGINT arrived while a finalizer ran: the handler raises here
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)

    queries = [Query(f"q{i}", f"text {i}") for i in range(4)]
    scored = []

    def score(chunk):
        scored.append([q.id for q in chunk])
        if len(scored) == 1:
            Finalized()  # swallowed: the first chunk still returns its table
        return ScoreTable([q.id for q in chunk], [None] * len(chunk), torch.zeros(len(chunk)),
                          torch.zeros(len(chunk), 0), [], None, {}, [{} for _ in chunk])

    # Python's own handler, as in a terminal (pytest itself may run with SIGINT ignored: a job
    # started in the background by a non-interactive shell)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with interrupts.remembered():
            assert signal.getsignal(signal.SIGINT) is interrupts._on_sigint
            with RunDir(tmp_path / "run", {"test": 1}) as run:
                with pytest.raises(KeyboardInterrupt):
                    run.score(score, queries, "baseline", 2)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    assert scored == [["q0", "q1"]]  # the second shard was never started
    assert reported == []  # the swallowed report was silenced (no traceback on stderr)
    interrupts.check()  # cleared once the block ends

    # outside the CLI's block a finalizer's KeyboardInterrupt is reported as Python always did
    class Interrupted:
        def __del__(self):
            raise KeyboardInterrupt

    Interrupted()
    assert reported == [KeyboardInterrupt]
    interrupts.check()


def test_an_ignored_sigint_stays_ignored():
    import signal

    from experiments import interrupts

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupts.remembered():
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_sigterm_prints_one_line_exits_143_and_releases_the_lock(tmp_path):
    """SIGTERM (a SLURM time limit, `docker stop`) takes Ctrl-C's way out while a run directory is
    locked: one line, exit code 143, the lock released (a run resumed from another host of a
    shared filesystem would otherwise be refused), the finished shards kept."""
    import signal

    from benchmarks.bad_inputs import interrupt_after_first_shard

    out = tmp_path / "run"
    proc, err, running = interrupt_after_first_shard(out, sig=signal.SIGTERM)
    assert running, err[-2000:]
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1].split("\r")[-1] == "terminated (SIGTERM): rerun the same command to resume"
    assert "Traceback" not in err
    assert not (out / ".lock").exists()
    assert (out / "shards" / "baseline" / "00000" / "shard.json").is_file()


def test_the_sigterm_handler_is_in_force_only_while_a_lock_is_held(tmp_path, monkeypatch):
    """Installed by the first run directory that takes its lock, kept while any holds one, the
    default action restored after the last; a caller's own handler is left alone, and nothing is
    installed off the main thread (where Python cannot set handlers)."""
    import os
    import signal
    import threading

    from experiments import interrupts
    from experiments.runs import RunDir

    monkeypatch.setattr(interrupts, "_pending", None)  # restored after the test
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with RunDir(tmp_path / "a", {"a": 1}) as a:
        assert signal.getsignal(signal.SIGTERM) is interrupts._on_sigterm
        with RunDir(tmp_path / "b", {"b": 1}):
            pass
        assert signal.getsignal(signal.SIGTERM) is interrupts._on_sigterm  # `a` still holds its lock
        with pytest.raises(interrupts.Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs in the main thread at the next bytecode
        assert (a.path / ".lock").exists()  # until `a` closes ...
    assert not (tmp_path / "a" / ".lock").exists()  # ... which the `with` did on the way out
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    def own(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, own)
    try:
        with RunDir(tmp_path / "c", {"c": 1}):
            assert signal.getsignal(signal.SIGTERM) is own
        assert signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, previous)

    seen = []

    def in_a_thread():
        with RunDir(tmp_path / "d", {"d": 1}):
            seen.append(signal.getsignal(signal.SIGTERM))

    worker = threading.Thread(target=in_a_thread)
    worker.start()
    worker.join()
    assert seen == [signal.SIG_DFL] and not (tmp_path / "d" / ".lock").exists()
