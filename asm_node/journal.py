"""The node's run journal: every run id it has started, durable across restarts (SQLite).

The journal is what makes a StartRun idempotent beyond the in-memory retention:
a run id is written (status ``running``) before its CLI is spawned and updated
when the run ends, so after an eviction or a node restart the same id gets the
run's final outcome, or ``run_lost`` when the node restarted while it ran, and
never a second execution.

One small table in WAL mode with ``synchronous=NORMAL``: a commit is a write to
the WAL without fsync (durable against a crash of the agent, not of the host's
power), tens of microseconds, so it is done inline on the event loop. Every
failure after the journal was opened is logged at ERROR and counted
(``asm_node_journal_failures{op}``). The admission write and the reads fail
closed: they raise :class:`NodeNotReady` (``reason=journal_unavailable``) and
the StartRun is refused before anything is spawned, since a run id the journal
did not record (or could not look up) might later run a second time. A failed
end write is only logged: the run already ran, and its id is then ``run_lost``.
A journal that cannot be opened is a :class:`ConfigError` at start-up
(``reason=journal_unusable``).

``path=None`` keeps the journal in memory (library ``NodeAgent()`` and the
embedded node of ``asm run``): same behaviour within one process, nothing kept.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from asm_wire import ConfigError, NodeNotReady

log = logging.getLogger("asm_node.journal")

JOURNAL_FILE = "journal.sqlite3"
LOCK_FILE = "journal.lock"
#: 2 added ``error_reason`` (a deadline's run_timeout / idle_timeout ...); a version-1 journal is upgraded in place.
SCHEMA_VERSION = 2
#: The first terminal error of a run is kept, cut to this many characters.
MAX_ERROR_CHARS = 2000
#: At most this many ended runs are kept (NodeConfig.journal_max_runs; the oldest ended are forgotten first).
DEFAULT_MAX_RUNS = 1_000_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id        TEXT PRIMARY KEY,
    owner         TEXT NOT NULL,
    session_id    TEXT NOT NULL,
    provider      TEXT NOT NULL,
    started_ns    INTEGER NOT NULL,
    epoch         TEXT NOT NULL,
    status        TEXT NOT NULL,
    exit_code     INTEGER NOT NULL DEFAULT -1,
    last_seq      INTEGER NOT NULL DEFAULT 0,
    finished_ns   INTEGER NOT NULL DEFAULT 0,
    error_kind    TEXT NOT NULL DEFAULT '',
    error_domain  TEXT NOT NULL DEFAULT '',
    error_message TEXT NOT NULL DEFAULT '',
    error_reason  TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS runs_finished ON runs (finished_ns);
"""


@dataclass(frozen=True)
class JournalEntry:
    run_id: str
    owner: str
    session_id: str
    provider: str
    started_ns: int
    epoch: str
    #: running | completed | failed | interrupted | lost
    status: str
    exit_code: int
    last_seq: int
    finished_ns: int
    error_kind: str
    error_domain: str
    error_message: str
    #: The error's typed cause (its event's ``metadata["reason"]``), e.g. ``run_timeout``; "" when none.
    error_reason: str = ""


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/asm/node``, else ``~/.local/state/asm/node``."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "asm" / "node"


def _unusable(where: object, why: str) -> ConfigError:
    return ConfigError(f"the node's run journal in {where} cannot be used: {why} "
                       "(give --state-dir a writable directory of its own)", reason="journal_unusable")


class Journal:
    """The run journal of one node agent (one process per state dir: it is locked)."""

    def __init__(self, state_dir: Path | None, epoch: str, max_age_s: float,
                 on_failure: Callable[[str], None] | None = None, max_runs: int = DEFAULT_MAX_RUNS) -> None:
        self.epoch = epoch
        self.max_age_s = max_age_s
        self.max_runs = max(1, max_runs)
        #: Runs ended since the last prune: the cap is also enforced every tenth of it ended (amortised).
        self._since_prune = 0
        self.path = state_dir / JOURNAL_FILE if state_dir is not None else None
        self._on_failure = on_failure
        self._lock_fd: int | None = None
        self.lost_at_open = 0
        try:
            if state_dir is not None:
                if state_dir.exists() and not state_dir.is_dir():
                    raise _unusable(state_dir, "it is not a directory")
                state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                self._lock(state_dir)
            self._db = sqlite3.connect(str(self.path) if self.path else ":memory:", isolation_level=None,
                                       check_same_thread=False)
            try:
                self._setup()
            except BaseException:
                self._db.close()
                raise
        except OSError as exc:
            self._unlock()
            raise _unusable(state_dir, exc.strerror or str(exc)) from None
        except sqlite3.Error as exc:
            self._unlock()
            raise _unusable(self.path, str(exc)) from None

    def _lock(self, state_dir: Path) -> None:
        fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _unusable(state_dir, "another node agent uses this state dir (give each its own --state-dir)") \
                from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _setup(self) -> None:
        db = self._db
        if self.path is not None:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"WAL mode refused (journal_mode={mode})")
        db.execute("PRAGMA synchronous=NORMAL")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"schema version {version} is newer than this agent's ({SCHEMA_VERSION})")
        db.executescript(_SCHEMA)
        if version == 1:  # CREATE TABLE IF NOT EXISTS kept the old table: add what version 2 has
            db.execute("ALTER TABLE runs ADD COLUMN error_reason TEXT NOT NULL DEFAULT ''")
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        # The previous agent on this state dir is gone (we hold its lock): what it left running is lost.
        cur = db.execute("UPDATE runs SET status='lost', finished_ns=? WHERE status='running' AND epoch<>?",
                         (time.time_ns(), self.epoch))
        self.lost_at_open = cur.rowcount
        self.prune()

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        self._unlock()

    def _failed(self, op: str, what: str, exc: sqlite3.Error) -> None:
        log.error("run journal %s: %s failed: %s", self.path or ":memory:", what, exc)
        if self._on_failure is not None:
            self._on_failure(op)

    def _unavailable(self, what: str, exc: sqlite3.Error) -> NodeNotReady:
        return NodeNotReady(f"this node's run journal cannot be used ({what}: {exc}); it starts no run it cannot "
                            "record (try another node, or later)", reason="journal_unavailable")

    # -- writes (an end or a prune that fails is logged and counted; the admission raises) --------

    def _write(self, what: str, sql: str, params: tuple[object, ...]) -> int:
        try:
            return self._db.execute(sql, params).rowcount
        except sqlite3.Error as exc:
            self._failed("write", what, exc)
            return 0

    def started(self, run_id: str, owner: str, session_id: str, provider: str, started_ns: int) -> None:
        """A run is admitted (called before its CLI is spawned, before its Run exists).

        Raises :class:`NodeNotReady` (``journal_unavailable``) when it cannot be recorded, and when
        the id is already journaled (a plain INSERT: an old row is never overwritten): the caller
        must then not run it.
        """
        what = f"recording run {run_id}"
        try:
            self._db.execute("INSERT INTO runs (run_id, owner, session_id, provider, started_ns, epoch, status) "
                             "VALUES (?, ?, ?, ?, ?, ?, 'running')",
                             (run_id, owner, session_id, provider, started_ns, self.epoch))
        except sqlite3.Error as exc:
            self._failed("write", what, exc)
            raise self._unavailable(what, exc) from None

    def finished(self, run_id: str, status: str, exit_code: int, last_seq: int, finished_ns: int,
                 error: tuple[str, str, str, str] | None) -> None:
        """A run ended; ``error`` is its first failing error as (kind, domain, message, reason)."""
        kind, domain, message, reason = error or ("", "", "", "")
        self._write(f"ending run {run_id}",
                    "UPDATE runs SET status=?, exit_code=?, last_seq=?, finished_ns=?, error_kind=?, error_domain=?, "
                    "error_message=?, error_reason=? WHERE run_id=?",
                    (status, exit_code, last_seq, finished_ns, kind, domain, message[:MAX_ERROR_CHARS],
                     reason[:MAX_ERROR_CHARS], run_id))
        self._since_prune += 1
        if self._since_prune >= max(1, self.max_runs // 10):  # the row cap holds between periodic prunes too
            self.prune()

    def prune(self) -> int:
        """Forget ended runs that ended more than ``max_age_s`` ago, then the oldest ended runs past
        ``max_runs``; the number forgotten. Running rows are never pruned (that id would run again)."""
        self._since_prune = 0
        cutoff = time.time_ns() - int(self.max_age_s * 1e9)
        n = self._write("pruning", "DELETE FROM runs WHERE status<>'running' AND finished_ns<?", (cutoff,))
        # The ended row just past the cap, newest first (a walk of the finished_ns index): it and all
        # older ended rows go.
        try:
            row = self._db.execute("SELECT finished_ns FROM runs WHERE status<>'running' "
                                   "ORDER BY finished_ns DESC LIMIT 1 OFFSET ?", (self.max_runs,)).fetchone()
        except sqlite3.Error as exc:
            self._failed("write", "pruning", exc)
            return n
        if row is not None:
            n += self._write("pruning", "DELETE FROM runs WHERE status<>'running' AND finished_ns<=?", (row[0],))
        return n

    # -- reads --------------------------------------------------------------------------

    def get(self, run_id: str) -> JournalEntry | None:
        """The entry of ``run_id``, None when it is not journaled.

        A failed read raises :class:`NodeNotReady` (``journal_unavailable``): it is never taken
        for "unknown id" (which would let a known id run again).
        """
        what = f"reading run {run_id}"
        try:
            row = self._db.execute(
                "SELECT run_id, owner, session_id, provider, started_ns, epoch, status, exit_code, last_seq, "
                "finished_ns, error_kind, error_domain, error_message, error_reason FROM runs WHERE run_id=?", (run_id,)).fetchone()
        except sqlite3.Error as exc:
            self._failed("read", what, exc)
            raise self._unavailable(what, exc) from None
        return JournalEntry(*row) if row else None

    def mark_lost(self, run_id: str) -> None:
        self._write(f"marking run {run_id} lost", "UPDATE runs SET status='lost', finished_ns=? WHERE run_id=? "
                    "AND status='running'", (time.time_ns(), run_id))

    def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM runs").fetchone()[0])
