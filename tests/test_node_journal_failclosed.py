"""The node's run journal fails closed: a run id it cannot record or look up is never run.

In-process ``NodeAgent`` with its in-memory journal; the journal's connection is
replaced by one that fails the statements a test picks (the stand-in for a full
disk or an I/O error). The CLI appends one line to a marker file per execution,
so the marker's line count is how many times it ran.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from asm_node import NodeAgent
from asm_node.journal import Journal
from asm_node.providers import CommandSpec, RunSpec
from asm_node.testing import ScriptedProvider, test_config
from asm_wire import NodeNotReady, RunNotFound, make_error, pb

COUNT = "import sys\nwith open(sys.argv[1], 'a') as f:\n    f.write('ran\\n')\nprint('hi', flush=True)\n"


class FailingDb:
    """A journal connection whose statements starting with one of ``fail`` raise sqlite3.OperationalError."""

    def __init__(self, db: sqlite3.Connection, *fail: str) -> None:
        self.db, self.fail = db, tuple(f.upper() for f in fail)

    def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        if sql.lstrip().upper().startswith(self.fail):
            raise sqlite3.OperationalError("disk I/O error")
        return self.db.execute(sql, params)

    def close(self) -> None:
        self.db.close()


class FileProvider(ScriptedProvider):
    """The counting CLI, with one run file of its own (as Codex's schema or Gemini's settings)."""

    def __init__(self, marker: Path, files: list[str]) -> None:
        super().__init__(script=COUNT, args=lambda spec: [str(marker)])
        self.files = files

    def build_command(self, spec: RunSpec) -> CommandSpec:
        command = super().build_command(spec)
        fd, path = tempfile.mkstemp(prefix="asm-test-run-file-")
        os.close(fd)
        self.files.append(path)
        return CommandSpec(argv=command.argv, cwd=command.cwd, env=command.env, run_files=(path,))


def exists(path: str) -> bool:
    return os.path.exists(path)


def lines(marker: Path) -> int:
    return len(marker.read_text().splitlines()) if marker.exists() else 0


async def events(stream: AsyncIterator[pb.EventBatch]) -> list[pb.Event]:
    return [ev async for batch in stream for ev in batch.events]


@pytest.fixture
async def agent_files(tmp_path: Path) -> AsyncIterator[tuple[NodeAgent, Path, list[str]]]:
    marker, files = tmp_path / "marker.txt", []
    agent = NodeAgent(test_config(retention_max_runs=0), providers={"scripted": FileProvider(marker, files)})
    await agent.start()
    real = agent.journal._db
    try:
        yield agent, marker, files
    finally:
        agent.journal._db = real
        await agent.stop()
        for path in files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


async def test_a_start_the_journal_cannot_record_is_refused_and_nothing_runs(
        agent_files: tuple[NodeAgent, Path, list[str]]) -> None:
    agent, marker, files = agent_files
    real = agent.journal._db
    agent.journal._db = FailingDb(real, "INSERT")  # type: ignore[assignment]
    request = pb.StartRunRequest(run_id="fc-1", provider="scripted", prompt="p")
    failures = agent.metrics.journal_failures.labels("write")
    before = failures._value.get()
    for _ in range(2):  # a retry of the same id is refused the same way, never run
        with pytest.raises(NodeNotReady) as caught:
            await events(agent.start_run(request))
        assert caught.value.reason == "journal_unavailable" and caught.value.grpc_status().name == "UNAVAILABLE"
    assert lines(marker) == 0 and "fc-1" not in agent.runs and agent.active_runs() == 0
    assert failures._value.get() == before + 2
    assert files and not any(map(exists, files))  # the refused runs' files are removed
    # The journal works again: the id runs once, then is answered from the journal, never run again.
    agent.journal._db = real
    first = await events(agent.start_run(request))
    assert first[-1].run_completed.status == "completed" and "fc-1" not in agent.runs  # evicted
    again = await events(agent.start_run(request))
    assert [e.kind for e in again] == [pb.EVENT_KIND_RUN_COMPLETED] and lines(marker) == 1


async def test_a_closed_journal_runs_no_id_twice(agent_files: tuple[NodeAgent, Path, list[str]]) -> None:
    agent, marker, _ = agent_files
    agent.journal._db.close()  # every read and write fails from now on
    request = pb.StartRunRequest(run_id="fc-2", provider="scripted", prompt="p")
    for _ in range(2):
        with pytest.raises(NodeNotReady):
            await events(agent.start_run(request))
    assert lines(marker) == 0
    agent.journal._db = sqlite3.connect(":memory:")  # agent.stop() closes it


async def test_a_journal_read_failure_is_not_an_unknown_id(agent_files: tuple[NodeAgent, Path, list[str]]) -> None:
    agent, marker, _ = agent_files
    request = pb.StartRunRequest(run_id="fc-3", provider="scripted", prompt="p")
    await events(agent.start_run(request))
    assert lines(marker) == 1 and "fc-3" not in agent.runs  # ran once, evicted, journaled
    agent.journal._db = FailingDb(agent.journal._db, "SELECT")  # type: ignore[assignment]
    with pytest.raises(NodeNotReady) as caught:
        await events(agent.start_run(request))
    assert caught.value.reason == "journal_unavailable"
    with pytest.raises(NodeNotReady):
        await events(agent.attach_run(pb.AttachRunRequest(run_id="fc-3")))
    with pytest.raises(NodeNotReady):
        await agent.get_run(pb.GetRunRequest(run_id="fc-3"))
    assert lines(marker) == 1
    # An id truly unknown still is RunNotFound once the journal answers.
    agent.journal._db = agent.journal._db.db  # type: ignore[attr-defined]
    with pytest.raises(RunNotFound):
        await agent.get_run(pb.GetRunRequest(run_id="fc-never"))


def test_started_never_overwrites_a_journaled_id() -> None:
    journal = Journal(None, "epoch-a", 3600.0)
    try:
        journal.started("dup", "alice", "s", "shell", 1)
        journal.finished("dup", "completed", 0, 7, 2, None)
        with pytest.raises(NodeNotReady):
            journal.started("dup", "bob", "s2", "shell", 3)
        entry = journal.get("dup")
        assert entry is not None and (entry.owner, entry.status, entry.last_seq) == ("alice", "completed", 7)
    finally:
        journal.close()


def test_journal_unavailable_keeps_its_class_over_the_wire() -> None:
    err = NodeNotReady("x", reason="journal_unavailable")
    back = make_error(err.kind, err.domain, err.message, err.reason)
    assert type(back) is NodeNotReady and back.grpc_status().name == "UNAVAILABLE"
