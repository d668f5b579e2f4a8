"""Run directories that survive interruption and never trust what they cannot check.

    runs/<name>/config.json                         the options (to rerun), the run's fingerprint, versions
    runs/<name>/.lock                               pid and host of the process writing the run
    runs/<name>/shards/<condition>/<k>/             one ScoreTable per chunk of ``batch`` queries
                                                    (length-planned: see `length_order`)
    runs/<name>/shards/<condition>/<k>/shard.json   what the shard was scored from, and its checksums
    runs/<name>/tables/*.csv|json, report.md, *.png written by the experiment

The **fingerprint** of a run is what changes its scores and is the same for every condition: the
model (name or path, config hash, dtype, small weight files by content), the readout and the
prompt format. Re-running with the same fingerprint resumes; another fingerprint is refused (use
another --out, or --overwrite). Options that change only the analysis, the spelling of --out or
the list of defenses are not part of it: adding defenses scores only the new ones.

Each shard records its condition, the condition's fingerprint (the defense and its parameters),
the run's fingerprint, each query's id and a hash of its text, label, image and metadata, and
the sha256 of its files. A shard that does not match what is asked now (other queries, changed
texts or images, another condition, another readout or model, a bad checksum, no record) is
recomputed with a warning naming it; so a dataset edited under the same ids recomputes only the
chunks holding the edited queries. Non-finite scores are a `ScoringError` naming the shard and the
query, never a silent table.

``--overwrite`` clears only an empty directory or a mechprobe run (a config.json with the
mechprobe marker, or a run whose config.json was lost); anything else is refused. config.json is
written atomically. A lock file makes a second process on the same directory fail at once; a
lock left by a dead process on this host is taken over with a warning. While the lock is held,
SIGTERM raises `experiments.interrupts.Terminated` (as Ctrl-C raises KeyboardInterrupt), so a
scheduler's time limit releases it too.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import platform
import shutil
import socket
import time
import weakref
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

from probing.errors import GenerationNeeded, RunDirError, ScoringError
from probing.query import Query
from probing.score_table import ScoreTable, file_digests

from .interrupts import check as check_interrupted
from .interrupts import hold_sigterm, release_sigterm
from .report import write_table

logger = logging.getLogger(__name__)
_PACKAGES = ("mechprobe", "torch", "transformers", "transformer-lens", "numpy", "scipy", "scikit-learn", "pillow")
#: The marker written into config.json: only a directory carrying it may be cleared by --overwrite.
MARKER = "mechprobe-run"
RUN_FORMAT = 2
LOCK = ".lock"
SHARD_RECORD = "shard.json"
#: What mechprobe itself writes at the top of a run directory (a run whose config.json was lost is
#: recognised by holding shards/ and nothing but these).
_OWN_NAMES = {"config.json", "shards", "tables", "scores", "report.md", "report.html", "models", "generations", LOCK,
              "summary.csv", "summary.json"}
_OPEN: "weakref.WeakSet[RunDir]" = weakref.WeakSet()


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def digest(obj) -> str:
    """sha256 of a JSON-able object (keys sorted; other objects by their str)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def query_digest(q: Query) -> str:
    """A hash of what a query's score depends on: id, text, label, metadata and its image (an in-memory
    image by its pixels, a file by absolute path, size and modification time)."""
    h = hashlib.sha256()
    h.update(json.dumps([q.id, q.text, q.label, q.meta], sort_keys=True, default=str).encode())
    image = q.image
    if image is None:
        h.update(b"no image")
    elif hasattr(image, "tobytes"):
        h.update(f"pil:{image.mode}:{image.size}".encode())
        h.update(image.tobytes())
    else:
        path = os.path.abspath(os.fspath(image))
        try:
            st = os.stat(path)
            h.update(f"file:{path}:{st.st_size}:{st.st_mtime_ns}".encode())
        except OSError:
            h.update(f"missing:{path}".encode())
    return h.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    except OSError:
        return False
    return True


def write_atomic(path: Path, text: str) -> None:
    """``text`` in ``path``, whole or not at all: an interruption leaves the old file (or none)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_cache(file: Path, then: str) -> dict:
    """A JSON object cached in the run directory; {} when absent, and, with a warning naming the
    file, when unreadable (truncated, damaged): a cache is recomputed, never a reason to fail."""
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"a JSON {type(data).__name__}, not an object")
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        logger.warning("%s is unreadable (%s); %s", file, exc, then)
        return {}
    return data


def close_all() -> None:
    """Release the lock of every run directory this process still holds (the CLI calls it in
    ``finally``; it also runs at exit)."""
    for run in list(_OPEN):
        run.close()


atexit.register(close_all)


def length_order(queries: Sequence[Query]) -> list[int]:
    """The order in which a run directory cuts a condition's queries into shards: text-only
    queries first, then queries with an image (stable: each group keeps the input order).

    An image is most of a prompt's tokens (576 of ~600 for LLaVA-1.5), and the scorer sorts each
    shard's rows by token length but can only pad as little as the queries it holds: cut in input
    order, a dataset that interleaves kinds (the toy, MM-SafetyBench's TEXT and image kinds) pads
    short text prompts to an image's length in nearly every shard. The key is whether a query has
    an image and nothing else, so the same queries cut the same shards (a rerun resumes) and an
    edited text recomputes only its own shard; tables come back in input order."""
    return sorted(range(len(queries)), key=lambda i: queries[i].has_image)


class RunDir:
    """A run directory bound to one config (a JSON-able dict), locked while open.

    Args:
        path: the directory (created if absent; relative or absolute, the same run either way).
        config: every option of the run, stored in config.json so the run can be repeated.
        overwrite: clear the directory first; refused unless it is empty or a mechprobe run.
        ignore: config keys that do not identify the run (analysis options); used only when no
            ``fingerprint`` is given.
        fingerprint: what identifies the run's scores (model, readout, prompt format...); a rerun
            with another fingerprint is refused. Default: ``config`` without the ``ignore`` keys.

    Use as a context manager, or call `close` (the CLI releases every open run at the end).
    """

    def __init__(self, path, config: dict, *, overwrite: bool = False, ignore=(), fingerprint: dict | None = None):
        self.path = Path(path)
        self.config = json.loads(json.dumps(config, default=str))
        if fingerprint is None:
            fingerprint = {k: v for k, v in self.config.items() if k not in ignore}
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))
        self.digests: dict[str, str] = {}
        self._lock: Path | None = None
        self._sigterm = False  # whether this run holds the SIGTERM handler (`experiments.interrupts`)
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"--out {self.path} is a file, not a directory; choose another --out")
        cfg_file = self.path / "config.json"
        old = self._check_owner(overwrite)
        self.path.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        try:
            if overwrite:
                self._clear()
                old = None
            if old is not None:
                self._compare(old, cfg_file)
            write_atomic(cfg_file, json.dumps({MARKER: RUN_FORMAT, "config": self.config,
                                                "fingerprint": self.fingerprint,
                                                "versions": package_versions()}, indent=1))
        except BaseException:
            self.close()
            raise

    # -- ownership, config and lock ------------------------------------------------------------

    def _read_config(self) -> dict | None:
        """The stored config.json, None if absent; a damaged one is an error naming the file."""
        cfg_file = self.path / "config.json"
        if not cfg_file.is_file():
            return None
        try:
            data = json.loads(cfg_file.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError(f"a JSON {type(data).__name__}, not an object")
        except (ValueError, UnicodeDecodeError) as exc:
            raise RunDirError(f"{cfg_file} is damaged (not a JSON object: {exc}); delete that file to resume the run "
                              f"(every shard is checked on its own) or pass --overwrite to start over") from None
        return data

    def _foreign(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir()
                      if p.name not in _OWN_NAMES and p.suffix != ".png" and not p.name.endswith(".tmp"))

    def _check_owner(self, overwrite: bool) -> dict | None:
        """Refuse to write into (or clear) a directory that is not empty and holds no mechprobe run."""
        if not self.path.is_dir() or not any(self.path.iterdir()):
            return None
        try:
            data = self._read_config()
        except RunDirError:
            if overwrite and (self.path / "shards").is_dir() and not self._foreign():
                return None  # a run with a damaged config.json: --overwrite may clear it
            raise
        if data is not None and (MARKER in data or {"config", "versions"} <= set(data)):
            return data
        if data is None and not self._foreign():
            if (self.path / "shards").is_dir():
                logger.warning("%s has no config.json; resuming its shards, each checked on its own", self.path)
                return None
            if all(p.name == LOCK or p.name.endswith(".tmp") for p in self.path.iterdir()):
                return None  # a run that stopped before writing its config
        shown = self._foreign()[:5] or sorted(p.name for p in self.path.iterdir())[:5]
        what = "delete" if overwrite else "write into"
        raise RunDirError(f"--out {self.path} is not empty and is not a mechprobe run (it holds {shown}); refusing to "
                          f"{what} it: choose a new or empty --out")

    def _compare(self, old: dict, cfg_file: Path) -> None:
        if MARKER not in old:  # written by an older mechprobe: no fingerprint to compare
            logger.warning("%s was written by an older mechprobe; every shard is checked and recomputed if needed",
                           cfg_file)
            return
        before = old.get("fingerprint") or {}
        keys = sorted(k for k in set(before) | set(self.fingerprint) if before.get(k) != self.fingerprint.get(k))
        if keys:
            raise RunDirError(f"{self.path} holds a run with another config; use another --out or --overwrite "
                              f"(differs in: {keys})")
        logger.info("resuming run in %s", self.path)

    def _clear(self) -> None:
        """Remove everything but our lock (ownership was checked before)."""
        for entry in self.path.iterdir():
            if entry.name == LOCK:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        logger.info("cleared %s (--overwrite)", self.path)

    def _acquire_lock(self) -> None:
        lock = self.path / LOCK
        me = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
        # SIGTERM (a scheduler's time limit) raises from now until `close`, so the lock it would
        # otherwise leave behind is released; held before the lock exists, so no moment is missed
        self._sigterm = hold_sigterm()
        try:
            for _ in range(3):
                try:
                    fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    holder = self._lock_holder(lock)
                    if holder is None:  # vanished meanwhile, or taken over: try again
                        continue
                    raise RunDirError(holder)
                with os.fdopen(fd, "w") as fh:
                    json.dump(me, fh)
                self._lock = lock
                _OPEN.add(self)
                return
            raise RunDirError(f"cannot take the lock {lock}; another process keeps creating it")
        except BaseException:
            self._release_sigterm()
            raise

    def _release_sigterm(self) -> None:
        held, self._sigterm = self._sigterm, False
        if held:
            release_sigterm()

    def _lock_holder(self, lock: Path) -> str | None:
        """Why the lock cannot be taken (a message), or None once a stale lock was removed."""
        try:
            raw = lock.read_text()
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            info = json.loads(raw)
            pid, host = int(info["pid"]), str(info["host"])
        except (ValueError, KeyError, TypeError):
            if age < 10:  # being written right now
                return f"another process is opening the run in {self.path} (lock file {lock}); try again"
            logger.warning("taking over the unreadable lock %s", lock)
            lock.unlink(missing_ok=True)
            return None
        if host == socket.gethostname() and not _pid_alive(pid):
            logger.warning("taking over the stale lock %s of process %d (no longer running)", lock, pid)
            lock.unlink(missing_ok=True)
            return None
        if host == socket.gethostname() and pid == os.getpid():
            return (f"this process already has the run in {self.path} open (a Study or Session not closed: "
                    f"call its close(), or use it in a with block); lock file {lock}")
        return (f"another mechprobe process (pid {pid} on {host}) is writing the run in {self.path}; wait for it to "
                f"finish or use another --out (if that process is gone, delete {lock})")

    def close(self) -> None:
        """Release the lock (idempotent)."""
        lock, self._lock = self._lock, None
        _OPEN.discard(self)
        try:
            if lock is None:
                return
            try:
                info = json.loads(lock.read_text())
                if info.get("pid") == os.getpid():
                    lock.unlink()
            except (OSError, ValueError):
                pass
        finally:
            self._release_sigterm()

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- scoring -------------------------------------------------------------------------------

    def score(self, score_fn: Callable[[list[Query]], ScoreTable], queries: Sequence[Query], condition: str,
              batch: int, *, fingerprint: dict | None = None) -> ScoreTable:
        """Score ``queries`` under ``condition`` shard by shard (``batch`` queries each), resuming.

        ``fingerprint``: what identifies the condition's scores beyond the run's own fingerprint
        (the defense, its parameters, the baseline it was built from). A stored shard is used only
        if everything matches; otherwise it is recomputed with a warning naming it.
        """
        if self._lock is None:
            raise RunDirError(f"the run directory {self.path} was closed; open it again to score")
        if not isinstance(batch, int) or batch < 1:
            raise RunDirError(f"shard size (batch) must be an integer >= 1, got {batch!r}")
        queries = list(queries)
        root = self.path / "shards" / condition
        parts, sums = [], []
        for k, chunk in enumerate(self.shard_chunks(queries, batch)):
            shard = root / f"{k:05d}"
            expect = self._expect(condition, fingerprint, chunk)
            table, record = self._load_shard(shard, expect)
            if table is None:
                check_interrupted()  # a Ctrl-C a finalizer swallowed stops the run here
                try:
                    table = score_fn(chunk)
                except GenerationNeeded:  # a signal to the caller, not a failure
                    raise
                except ScoringError as exc:  # the scorer names the call and queries; add where they belong
                    raise ScoringError(f"shard {shard} (condition {condition!r}): {exc}") from exc
                record = self._store(shard, table, expect)
            parts.append(table)
            sums.append(record["files"])
        self.digests[condition] = digest(sums)
        table = ScoreTable.concat(parts)
        return table if table.ids == [q.id for q in queries] else table.select([q.id for q in queries])

    @staticmethod
    def shard_chunks(queries: Sequence[Query], batch: int) -> list[list[Query]]:
        """The chunks `score` cuts ``queries`` into, in shard order: shard k holds chunk k."""
        planned = [queries[i] for i in length_order(queries)]
        return [planned[start:start + batch] for start in range(0, len(planned), batch)]

    def _expect(self, condition: str, fingerprint: dict | None, chunk: list[Query]) -> dict:
        """What shard records of ``condition`` for ``chunk`` must hold to be reused."""
        return {"condition": condition, "condition_fingerprint": json.loads(json.dumps(fingerprint or {}, default=str)),
                "fingerprint": self.fingerprint, "queries": [[q.id, query_digest(q)] for q in chunk]}

    def _store(self, shard: Path, table: ScoreTable, expect: dict) -> dict:
        ids = [i for i, _ in expect["queries"]]
        if table.ids != ids:
            raise ScoringError(f"shard {shard}: the scorer returned rows {table.ids[:5]} for queries {ids[:5]}")
        table.check_finite(f"shard {shard}")
        return self._save_shard(shard, table, expect)

    def has_shard(self, condition: str, k: int, chunk: list[Query], *, fingerprint: dict | None = None) -> bool:
        """Whether shard ``k`` of ``condition`` has a record that matches ``chunk`` (its files are
        checked when `score` loads it; a damaged one is then recomputed)."""
        try:
            record = json.loads((self.path / "shards" / condition / f"{k:05d}" / SHARD_RECORD).read_text())
        except (OSError, ValueError):
            return False
        return isinstance(record, dict) and self._mismatch(record, self._expect(condition, fingerprint, chunk)) is None

    def store_shard(self, condition: str, k: int, chunk: list[Query], table: ScoreTable, *,
                    fingerprint: dict | None = None) -> None:
        """Save ``table`` as shard ``k`` of ``condition`` (``chunk``, as `shard_chunks` cut it),
        exactly as `score` would: for a caller that computes several conditions' shards together,
        so none waits in memory and an interruption loses none; `score` then loads it."""
        if self._lock is None:
            raise RunDirError(f"the run directory {self.path} was closed; open it again to score")
        self._store(self.path / "shards" / condition / f"{k:05d}", table, self._expect(condition, fingerprint, chunk))

    def condition_digest(self, condition: str) -> str | None:
        """A hash of a scored condition's shards (for conditions built from it, e.g. the baseline)."""
        return self.digests.get(condition)

    @staticmethod
    def _save_shard(shard: Path, table: ScoreTable, expect: dict) -> dict:
        (shard / SHARD_RECORD).unlink(missing_ok=True)  # the record goes last: a half-written shard has none
        table.save(shard)
        record = {**expect, "files": file_digests(shard)}
        write_atomic(shard / SHARD_RECORD, json.dumps(record))
        return record

    @staticmethod
    def _mismatch(record: dict, expect: dict) -> str | None:
        if record.get("condition") != expect["condition"]:
            return f"it was scored under condition {record.get('condition')!r}, not {expect['condition']!r}"
        if record.get("fingerprint") != expect["fingerprint"]:
            old = record.get("fingerprint") or {}
            keys = sorted(k for k in set(old) | set(expect["fingerprint"]) if old.get(k) != expect["fingerprint"].get(k))
            return f"it was scored with another {', '.join(keys) or 'setup'}"
        if record.get("condition_fingerprint") != expect["condition_fingerprint"]:
            return "the condition's defense, parameters or baseline changed"
        old_q, new_q = record.get("queries") or [], expect["queries"]
        if [i for i, _ in old_q] != [i for i, _ in new_q]:
            return "it holds other queries"
        changed = [i for (i, a), (_, b) in zip(old_q, new_q) if a != b]
        if changed:
            return f"queries changed since (text, label, image or metadata): {changed[:5]}"
        return None

    @staticmethod
    def _load_shard(shard: Path, expect: dict) -> tuple[ScoreTable | None, dict | None]:
        if not shard.exists():
            return None, None
        try:
            try:
                record = json.loads((shard / SHARD_RECORD).read_text())
            except FileNotFoundError:
                raise ValueError(f"it has no {SHARD_RECORD} (interrupted, or from an older mechprobe)") from None
            if not isinstance(record, dict):
                raise ValueError(f"its {SHARD_RECORD} is not an object")
            reason = RunDir._mismatch(record, expect)
            if reason:
                raise ValueError(reason)
            if file_digests(shard) != record.get("files"):
                raise ValueError("checksum mismatch: its files changed on disk (damaged or replaced)")
            table = ScoreTable.load(shard)
            if table.ids != [i for i, _ in expect["queries"]]:
                raise RunDirError("it holds other queries")
        except Exception as exc:  # any shard that cannot be trusted is recomputed, whatever broke it
            logger.warning("recomputing shard %s: %s", shard, exc)
            return None, None
        table.check_finite(f"shard {shard}")  # stored NaNs are an error, not something to recompute
        return table, record

    def write_table(self, name: str, rows: list[dict]) -> Path:
        """``tables/<name>.csv`` and ``.json`` (see experiments/report.py)."""
        return write_table(self.path / "tables" / name, rows)
