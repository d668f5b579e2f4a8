"""Try every bad input of issue 12 against the current code and print what happened, as a table.

    HF_HUB_OFFLINE=1 python benchmarks/bad_inputs.py            # about 1-2 minutes on 2 CPU cores

Each case builds its own temporary directory, runs the real command line (``experiments.cli.main``,
in this process; the lock and Ctrl-C cases with a second process) on the embedded toy model
and a small JSONL dataset, and classifies the outcome:

- **clear error**: exit code 2 (130 for Ctrl-C) and one line on stderr naming the file, record or
  option, with nothing deleted and no forward pass where none should run;
- **recomputed, warned**: a stored shard that no longer matches was scored again, with a warning
  naming it, and nothing else was;
- **resumed**: the same run was recognised and nothing was scored again;
- **handled**: the case has no error to give and the right thing happened (stated in the detail);
- **crash**: a traceback or an exception the CLI does not turn into one line;
- **silent**: exit 0 with a wrong or stale result, or a deleted file.

The last column says whether the outcome is the one wanted. Prints a markdown table (the one in
docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from experiments.cli import main  # noqa: E402
from probing import scorer as scorer_mod  # noqa: E402

FAST = ["--n-boot", "20", "--batch-size", "2"]


class Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record):
        self.records.append(record.getMessage())


LOG = Capture()

_real_score, _real_forward = scorer_mod.RefusalScorer.score, scorer_mod.RefusalScorer.forward
SCORED: list[tuple[str, list[str]]] = []
FORWARDS = [0]


def _spy_score(self, queries, **kw):
    queries = list(queries)
    condition = (kw.get("meta") or {}).get("condition")
    if condition is not None:
        SCORED.append((condition, [q.id for q in queries]))
    return _real_score(self, queries, **kw)


def _spy_forward(self, *a, **k):
    FORWARDS[0] += 1
    return _real_forward(self, *a, **k)


def install_spies() -> None:
    """Count the scorer's calls and keep the log records, for the table's cases. Only the script
    does this: a test importing a helper from this module must keep the real scorer and logging."""
    logging.getLogger().addHandler(LOG)  # main()'s basicConfig is then a no-op
    logging.getLogger().setLevel(logging.WARNING)
    scorer_mod.RefusalScorer.score = _spy_score
    scorer_mod.RefusalScorer.forward = _spy_forward


def cli(*argv) -> tuple[int | str, str]:
    """(exit code or exception name, stderr) of one in-process command; counters reset first."""
    SCORED.clear()
    LOG.records.clear()
    FORWARDS[0] = 0
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(list(argv))
        except SystemExit as exc:  # argparse
            rc = exc.code
        except BaseException as exc:  # noqa: BLE001 - a crash is what we look for
            return f"{type(exc).__name__}: {exc}", err.getvalue()
    return rc, err.getvalue()


def write_jsonl(path: Path, texts=None, labels=("benign", "harmful")) -> Path:
    texts = texts or {}
    rows = [{"id": f"q{i}", "text": texts.get(f"q{i}", f"Please explain topic number {i}."),
             "label": labels[i % len(labels)]} for i in range(6)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def one_line_error(rc, err: str, *needles: str) -> tuple[str, str]:
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and "Loading weights" not in ln]
    if lines and lines[0].startswith("usage:"):  # argparse: the usage, then its one error line
        lines = lines[-1:]
    if isinstance(rc, str):
        return "crash", rc[:140]
    if rc == 0:
        return "silent", "exit 0"
    if "Traceback" in err or len(lines) != 1:
        return "crash", f"exit {rc}, {len(lines)} lines on stderr"
    missing = [n for n in needles if n not in lines[0]]
    if missing:
        return "crash", f"exit {rc} but the message does not name {missing}: {lines[0][:120]}"
    return "clear error", lines[0]


def mech(tmp: Path, *extra, data=None, defenses="sr_self_reminder", out="run"):
    data = data or tmp / "q.jsonl"
    return cli("mechanisms", "--dataset", f"jsonl:{data}", "--defenses", defenses, *FAST,
               "--out", str(tmp / out) if not os.path.isabs(out) else out, *extra)


def warned(*needles) -> bool:
    return any(all(n in r for n in needles) for r in LOG.records)


# -- the cases -------------------------------------------------------------------------------------


def case_overwrite_thesis(tmp):
    thesis = tmp / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("four years")
    rc, err = cli("mechanisms", "--defenses", "sr_self_reminder", "--out", str(thesis), "--overwrite")
    if not (thesis / "thesis.tex").is_file():
        return "silent", "the folder was wiped"
    return one_line_error(rc, err, str(thesis), "thesis.tex")


def case_texts_changed(tmp):
    write_jsonl(tmp / "q.jsonl")
    mech(tmp)
    write_jsonl(tmp / "q.jsonl", {"q3": "A completely different request about topic three."})
    rc, err = mech(tmp)
    if rc != 0:
        return one_line_error(rc, err)
    chunks = sorted(ids for _, ids in SCORED)
    if chunks == [["q2", "q3"], ["q2", "q3"]] and warned("00001", "q3"):
        return "recomputed, warned", "only the shard holding q3, in each condition"
    return "silent", f"scored {chunks}"


def case_readout_changed_config_deleted(tmp):
    write_jsonl(tmp / "q.jsonl")
    mech(tmp)
    (tmp / "run" / "config.json").unlink()
    rc, err = mech(tmp, "--readout", "yes_no")
    if rc != 0:
        return one_line_error(rc, err)
    if len(SCORED) == 6 and warned("another readout"):
        return "recomputed, warned", "all 6 shards: 'scored with another readout'"
    return "silent", f"{len(SCORED)} shards scored"


def case_readout_changed(tmp):
    write_jsonl(tmp / "q.jsonl")
    mech(tmp)
    return one_line_error(*mech(tmp, "--readout", "yes_no"), "another config", "readout")


def case_copied_shard(tmp):
    write_jsonl(tmp / "q.jsonl")
    mech(tmp)
    dst = tmp / "run" / "shards" / "sr_self_reminder" / "00000"
    shutil.rmtree(dst)
    shutil.copytree(tmp / "run" / "shards" / "baseline" / "00000", dst)
    rc, err = mech(tmp)
    if rc == 0 and SCORED == [("sr_self_reminder", ["q0", "q1"])] and warned("condition 'baseline'"):
        return "recomputed, warned", "the copied shard only"
    return ("silent", f"scored {SCORED}") if rc == 0 else one_line_error(rc, err)


def case_bit_flip(tmp):
    write_jsonl(tmp / "q.jsonl")
    mech(tmp)
    f = tmp / "run" / "shards" / "baseline" / "00002" / "scores.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x10
    f.write_bytes(bytes(data))
    rc, err = mech(tmp)
    if rc == 0 and SCORED == [("baseline", ["q4", "q5"])] and warned("checksum"):
        return "recomputed, warned", "the damaged shard only ('checksum mismatch')"
    return ("silent", f"scored {SCORED}") if rc == 0 else one_line_error(rc, err)


def case_nan_scores(tmp):
    write_jsonl(tmp / "q.jsonl")

    def nan_forward(self, inputs, **kw):
        m, lens, h = _real_forward(self, inputs, **kw)
        m = m.clone()
        m[-1] = float("nan")
        return m, lens, h

    scorer_mod.RefusalScorer.forward = nan_forward
    try:
        rc, err = mech(tmp)
    finally:
        scorer_mod.RefusalScorer.forward = _spy_forward
    return one_line_error(rc, err, "shards/baseline/00000", "'q")


def case_config_truncated(tmp):
    write_jsonl(tmp / "q.jsonl")
    mech(tmp)
    cfg = tmp / "run" / "config.json"
    cfg.write_text(cfg.read_text()[:30])
    return one_line_error(*mech(tmp), str(cfg))


def case_two_writers(tmp):
    (tmp / "run").mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from experiments.runs import RunDir\n"
         "r = RunDir(sys.argv[1], {'x': 1}); print('ready', flush=True); time.sleep(60)", str(tmp / "run")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()
        write_jsonl(tmp / "q.jsonl")
        rc, err = mech(tmp)
    finally:
        holder.kill()
        holder.wait()
    return one_line_error(rc, err, "another mechprobe process", f"pid {holder.pid}")


def case_stale_lock(tmp):
    write_jsonl(tmp / "q.jsonl")
    mech(tmp)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp / "run" / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "time": 0}))
    rc, err = mech(tmp)
    if rc == 0 and not SCORED and warned("stale lock"):
        return "handled", "taken over with a warning; resumed"
    return ("silent", f"scored {SCORED}") if rc == 0 else one_line_error(rc, err)


def case_duplicate_ids(tmp):
    a, b = write_jsonl(tmp / "a.jsonl"), write_jsonl(tmp / "b.jsonl")
    rc, err = cli("mechanisms", "--dataset", f"jsonl:{a},jsonl:{b}", "--out", str(tmp / "run"))
    if FORWARDS[0]:
        return "silent", "scored before failing"
    return one_line_error(rc, err, "'q0' appears twice", "a.jsonl", "b.jsonl")


def case_tmp_leftovers(tmp):
    from probing import load_model

    own = tmp / "tmpdir"
    own.mkdir()
    old = tempfile.tempdir
    tempfile.tempdir = str(own)
    os.environ["MECHPROBE_CACHE"] = str(tmp / "cache")
    try:
        for _ in range(3):
            load_model("tiny-random")
    finally:
        tempfile.tempdir = old
        del os.environ["MECHPROBE_CACHE"]
    left = list(own.iterdir())
    if left:
        return "silent", f"{len(left)} folders left in the temp dir"
    return "handled", "3 loads: nothing in the temp dir; one cached source folder, reused"


def case_unknown_model(tmp):
    start = time.perf_counter()
    rc, err = cli("mechanisms", "--model", "llava-hf/llava-1.5-7b-typo", "--out", str(tmp / "run"))
    kind, detail = one_line_error(rc, err, "llava-hf/llava-1.5-7b-typo")
    return kind, f"{detail} [{time.perf_counter() - start:.2f} s]"


def case_misspelt_defense(tmp):
    rc, err = cli("mechanisms", "--defenses", "sr_self_reminder,qr_captoin", "--out", str(tmp / "run"))
    if FORWARDS[0]:
        return "silent", f"{FORWARDS[0]} forward passes before the error"
    return one_line_error(rc, err, "did you mean 'qr_caption'")


def case_one_label(tmp):
    data = write_jsonl(tmp / "q.jsonl", labels=("harmful",))
    rc, err = cli("mechanisms", "--dataset", f"jsonl:{data}", "--out", str(tmp / "run"))
    if FORWARDS[0]:
        return "silent", f"{FORWARDS[0]} forward passes before the error"
    return one_line_error(rc, err, "no benign", "q.jsonl")


def case_out_spelling(tmp):
    write_jsonl(tmp / "q.jsonl")
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        mech(tmp, out="run")
        rc, err = mech(tmp, out=str(tmp / "run"))
        rc2, err2 = mech(tmp, out="./run/../run")
    finally:
        os.chdir(cwd)
    if rc == rc2 == 0 and not SCORED:
        return "resumed", "relative, absolute and './run/../run': one run, nothing rescored"
    return ("silent", f"scored {SCORED}") if rc == rc2 == 0 else one_line_error(rc or rc2, err or err2)


def case_n_boot(tmp):
    write_jsonl(tmp / "q.jsonl")
    mech(tmp)
    rc, err = mech(tmp, "--n-boot", "33")
    if rc == 0 and not SCORED:
        return "resumed", "analysis options are not part of the run's identity"
    return ("silent", f"scored {SCORED}") if rc == 0 else one_line_error(rc, err)


def case_added_defense(tmp):
    write_jsonl(tmp / "q.jsonl")
    mech(tmp)
    rc, err = mech(tmp, defenses="sr_self_reminder,sr_mmsafety")
    if rc == 0 and {c for c, _ in SCORED} == {"sr_mmsafety"} and len(SCORED) == 3:
        return "resumed", "only the new defense was scored"
    return ("silent", f"scored {SCORED}") if rc == 0 else one_line_error(rc, err)


def case_limit(value):
    def run(tmp):
        return one_line_error(*cli("mechanisms", "--limit", value, "--out", str(tmp / "run")), "--limit")
    return run


def interrupt_after_first_shard(out: Path, env: dict | None = None,
                                sig: int = signal.SIGINT) -> tuple[subprocess.Popen, str, bool]:
    """Start `mechprobe mechanisms` writing ``out``, send ``sig`` (SIGINT: Ctrl-C) once its first
    baseline shard is written, and wait: (the process, its stderr, whether it was still running
    at the signal).

    The child gets SIGINT's default action back: a run started in the background by a
    non-interactive shell inherits SIGINT *ignored*, and Python then never raises
    KeyboardInterrupt."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "experiments.cli", "mechanisms", "--defenses", "sr_self_reminder",
                             "--batch-size", "2", "--out", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = out / "shards" / "baseline" / "00000" / "shard.json"
    deadline = time.time() + 180
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    running = proc.poll() is None
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc, err, running


def case_ctrl_c(tmp):
    out = tmp / "run"
    proc, err, _ = interrupt_after_first_shard(out)
    last = err.strip().splitlines()[-1].split("\r")[-1] if err.strip() else ""
    if proc.returncode == 130 and last == "interrupted: rerun the same command to resume" and "Traceback" not in err:
        lock = " (lock released)" if not (out / ".lock").exists() else " (LOCK LEFT BEHIND)"
        return "clear error", last + lock
    return "crash", f"exit {proc.returncode}: {last[:100]}"


CASES = [
    ("`--overwrite` on a folder holding a thesis", "clear error", case_overwrite_thesis),
    ("JSONL texts changed under the same ids", "recomputed, warned", case_texts_changed),
    ("config.json deleted, then the readout changed", "recomputed, warned", case_readout_changed_config_deleted),
    ("readout changed (config.json present)", "clear error", case_readout_changed),
    ("a shard copied from another condition", "recomputed, warned", case_copied_shard),
    ("a bit flipped in a shard's data", "recomputed, warned", case_bit_flip),
    ("NaN scores from the model", "clear error", case_nan_scores),
    ("config.json truncated", "clear error", case_config_truncated),
    ("a second process on the same run directory", "clear error", case_two_writers),
    ("a stale lock left by a dead process", "handled", case_stale_lock),
    ("duplicate query ids across concatenated datasets", "clear error", case_duplicate_ids),
    ("`load_model(\"tiny-random\")` three times: files left in the temp dir", "handled", case_tmp_leftovers),
    ("an unknown model name with HF_HUB_OFFLINE=1", "clear error", case_unknown_model),
    ("a misspelt defense name", "clear error", case_misspelt_defense),
    ("a dataset with only harmful queries", "clear error", case_one_label),
    ("the same --out written relatively and absolutely", "resumed", case_out_spelling),
    ("a changed --n-boot", "resumed", case_n_boot),
    ("a defense added to a finished run", "resumed", case_added_defense),
    ("`--limit 0`", "clear error", case_limit("0")),
    ("`--limit -5`", "clear error", case_limit("-5")),
    ("Ctrl-C while scoring (SIGINT)", "clear error", case_ctrl_c),
]


def main_table() -> int:
    rows, bad = [], 0
    for i, (what, wanted, fn) in enumerate(CASES, 1):
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="bad-input-") as d:
            try:
                got, detail = fn(Path(d))
            except BaseException as exc:  # noqa: BLE001
                got, detail = "crash", f"{type(exc).__name__}: {exc}"[:140]
        ok = got == wanted
        bad += not ok
        detail = detail.replace("|", "\\|").replace(d, "<tmp>")
        rows.append(f"| {i} | {what} | {wanted} | {got} | {'yes' if ok else '**NO**'} | {detail} | "
                    f"{time.perf_counter() - start:.1f} |")
        print(f"[{i}/{len(CASES)}] {what}: {got}", file=sys.stderr, flush=True)
    print("| # | bad input tried | wanted | got | as wanted | message / what happened | s |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    counts = {}
    for r in rows:
        got = r.split(" | ")[3]
        counts[got] = counts.get(got, 0) + 1
    print()
    print(f"{len(CASES)} bad inputs tried: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
          + f"; {len(CASES) - bad} as wanted.")
    return 1 if bad else 0


if __name__ == "__main__":
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    install_spies()
    sys.exit(main_table())
