"""The node's run journal: a run id the node has started never executes again.

Real ``asm node serve`` processes with ``--state-dir``: every run appends one
line to a marker file, so the number of lines is the number of times the CLI
ran. After a restart, an eviction or a SIGKILL mid-run, the same run id gets
the journaled outcome (or ``run_lost``), and the marker keeps one line.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from asm_controller import EmbeddedNode, GrpcNodeClient, RemoteNode, Session
from asm_node import NodeAgent
from asm_wire import AsmError, NodeNotReady, PermissionDenied, pb
from tests.support.processes import PYTHON_BASENAME, ROOT, NodeProcess, node_config, pid_alive, wait_until

pytestmark = pytest.mark.slow  # node processes restarted against their journals

COMPLETED = pb.EVENT_KIND_RUN_COMPLETED


def counting(marker: Path, exit_code: int = 0, sleep: float = 0.0) -> str:
    """A shell-provider prompt: append one line to ``marker``, print, maybe sleep, exit ``exit_code``."""
    code = (f"import os, sys, time\nwith open({str(marker)!r}, 'a') as f:\n    f.write(str(os.getpid()) + '\\n')\n"
            f"print('ran', flush=True)\ntime.sleep({sleep})\nsys.exit({exit_code})\n")
    encoded = base64.b64encode(code.encode()).decode()
    return f"{PYTHON_BASENAME} -c \"exec(__import__('base64').b64decode('{encoded}'))\""


def lines(marker: Path) -> int:
    return len(marker.read_text().splitlines()) if marker.exists() else 0


def serve_args(state: Path, *extra: str) -> list[str]:
    return ["--shell-allow", PYTHON_BASENAME, "--state-dir", str(state), *extra]


def asm_run(node: NodeProcess, run_id: str, prompt: str) -> tuple[int, dict[str, object]]:
    """``asm run --node N --run-id ID --output jsonl PROMPT``: its exit code and result_summary."""
    proc = subprocess.run(
        [sys.executable, "-m", "asm_cli", "run", "--node", node.address, "--provider", "shell", "--output", "jsonl",
         "--run-id", run_id, prompt], capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert "Traceback" not in proc.stderr, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["kind"] == "result_summary", proc.stdout
    return proc.returncode, summary


async def collect(client: GrpcNodeClient, request: pb.StartRunRequest | pb.AttachRunRequest) -> list[pb.Event]:
    stream = client.start_run(request) if isinstance(request, pb.StartRunRequest) else client.attach_run(request)
    return [ev async for batch in stream for ev in batch.events]


def test_restarted_node_answers_old_run_ids_with_their_outcome(
    node_process: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    state, ok_marker, bad_marker = tmp_path / "state", tmp_path / "ok.txt", tmp_path / "bad.txt"
    node = node_process(*serve_args(state))
    code_ok, first_ok = asm_run(node, "jr-ok", counting(ok_marker))
    code_bad, first_bad = asm_run(node, "jr-bad", counting(bad_marker, exit_code=3))
    assert (code_ok, first_ok["status"], first_ok["exit_code"]) == (0, "completed", 0)
    assert first_bad["status"] == "failed" and first_bad["exit_code"] == 3 and code_bad != 0
    assert node.stop() == 0
    again = node_process(*serve_args(state))
    assert again.epoch != node.epoch
    code_ok2, ok2 = asm_run(again, "jr-ok", counting(ok_marker))
    code_bad2, bad2 = asm_run(again, "jr-bad", counting(bad_marker, exit_code=3))
    assert lines(ok_marker) == 1 and lines(bad_marker) == 1  # neither prompt ran again
    assert (code_ok2, ok2["status"], ok2["exit_code"], ok2["error"]) == (0, "completed", 0, None)
    assert (code_bad2, bad2["status"], bad2["exit_code"]) == (code_bad, "failed", 3)
    assert isinstance(bad2["error"], dict) and bad2["error"]["kind"] == first_bad["error"]["kind"]  # type: ignore[index]

    async def direct() -> None:
        client = GrpcNodeClient(RemoteNode(again.address))
        try:
            info = await client.get_run(pb.GetRunRequest(run_id="jr-bad"))
            assert (info.status, info.exit_code) == (pb.RUN_STATUS_FAILED, 3)
            assert info.first_held_seq == info.last_seq + 1  # nothing held: only the outcome
            ok_info = await client.get_run(pb.GetRunRequest(run_id="jr-ok"))
            events = await collect(client, pb.AttachRunRequest(run_id="jr-ok", after_seq=0))
            assert [e.kind for e in events] == [COMPLETED]
            assert events[0].seq == ok_info.last_seq == first_ok["events"]  # the run's own last seq
            assert events[0].run_completed.status == "completed" and events[0].metadata["origin"] == "node_journal"
            # A follower that already saw the run's end gets nothing more.
            assert await collect(client, pb.AttachRunRequest(run_id="jr-ok", after_seq=events[0].seq)) == []
        finally:
            await client.close()

    asyncio.run(direct())
    assert lines(ok_marker) == 1 and lines(bad_marker) == 1


async def test_run_killed_with_its_node_is_run_lost(node_process: Callable[..., NodeProcess], tmp_path: Path) -> None:
    state, marker = tmp_path / "state", tmp_path / "marker.txt"
    node = node_process(*serve_args(state, "--detach-grace", "30"))
    client = GrpcNodeClient(RemoteNode(node.address))
    request = pb.StartRunRequest(run_id="jr-lost", provider="shell", prompt=counting(marker, sleep=60))
    follow = asyncio.create_task(collect(client, request))
    assert await asyncio.to_thread(wait_until, lambda: lines(marker) == 1, 20)
    cli_pid = int(marker.read_text().split()[0])
    node.stop(signal.SIGKILL)
    follow.cancel()
    await client.close()
    assert await asyncio.to_thread(wait_until, lambda: not pid_alive(cli_pid), 10)  # the reaper's work
    again = node_process(*serve_args(state))
    client = GrpcNodeClient(RemoteNode(again.address))
    try:
        for call in (lambda: collect(client, request),
                     lambda: collect(client, pb.AttachRunRequest(run_id="jr-lost")),
                     lambda: client.get_run(pb.GetRunRequest(run_id="jr-lost")),
                     lambda: collect(client, request)):  # still lost the second time: never started
            with pytest.raises(AsmError) as caught:
                await call()
            assert (caught.value.kind, caught.value.reason) == ("run_lost", "run_lost"), caught.value
            assert "jr-lost" in caught.value.message
    finally:
        await client.close()
    code, summary = await asyncio.to_thread(asm_run, again, "jr-lost", counting(marker, sleep=60))
    assert summary["status"] == "failed" and summary["error"]["kind"] == "run_lost" and code == 1  # type: ignore[index]
    assert lines(marker) == 1
    db = sqlite3.connect(state / "journal.sqlite3")
    try:
        assert db.execute("SELECT status FROM runs WHERE run_id='jr-lost'").fetchone() == ("lost",)
    finally:
        db.close()


async def test_evicted_run_is_answered_from_the_journal(node_process: Callable[..., NodeProcess],
                                                         tmp_path: Path) -> None:
    marker = tmp_path / "marker.txt"
    node = node_process(*serve_args(tmp_path / "state", "--retention-runs", "0"))
    async with Session("shell", node=RemoteNode(node.address)) as session:
        first = await session.query(counting(marker, exit_code=5), run_id="jr-evicted")
        assert (first.status, first.exit_code) == ("failed", 5)
    client = GrpcNodeClient(RemoteNode(node.address))
    try:
        held = await client.list_runs(pb.ListRunsRequest())
        assert [r.run_id for r in held.runs] == []  # evicted at once by --retention-runs 0
    finally:
        await client.close()
    async with Session("shell", node=RemoteNode(node.address)) as session:
        again = await session.query(counting(marker, exit_code=5), run_id="jr-evicted")
    assert lines(marker) == 1
    assert (again.status, again.exit_code) == ("failed", 5)
    assert again.error is not None and first.error is not None and again.error.kind == first.error.kind


def test_journal_entries_are_pruned_by_age(node_process: Callable[..., NodeProcess], tmp_path: Path) -> None:
    state, marker = tmp_path / "state", tmp_path / "marker.txt"
    # Periodic pruning: short retention makes the sweeper (and the journal pruning) run often.
    node = node_process(*serve_args(state, "--journal-max-age", "1", "--retention-seconds", "0.2"))
    asm_run(node, "jr-old", counting(marker))
    asm_run(node, "jr-old", counting(marker))
    assert lines(marker) == 1  # within the age: answered from memory or the journal

    def journaled() -> int:
        db = sqlite3.connect(state / "journal.sqlite3")
        try:
            return int(db.execute("SELECT count(*) FROM runs WHERE run_id='jr-old'").fetchone()[0])
        finally:
            db.close()

    assert wait_until(lambda: journaled() == 0, 10)
    asm_run(node, "jr-old", counting(marker))
    assert lines(marker) == 2  # forgotten: a new run with that id
    # Pruning at start: the entry written just now is over the age when the node comes back.
    node.stop()
    assert journaled() == 1
    time.sleep(1.2)
    node_process(*serve_args(state, "--journal-max-age", "1"))
    assert journaled() == 0


def _serve_fails(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "asm_cli", "node", "serve", "--listen", "127.0.0.1:0", *args],
                          capture_output=True, text=True, timeout=30, cwd=str(tmp_path))


def test_unusable_state_dir_is_a_typed_startup_error(node_process: Callable[..., NodeProcess],
                                                     tmp_path: Path) -> None:
    not_a_dir = tmp_path / "plain-file"
    not_a_dir.write_text("x")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "journal.sqlite3").write_bytes(b"this is not an SQLite database at all" * 100)
    shared = tmp_path / "shared"
    node_process("--state-dir", str(shared))
    for state, words in ((not_a_dir, "not a directory"), (corrupt, "not a database"), (shared, "another node agent")):
        proc = _serve_fails(tmp_path, "--state-dir", str(state))
        assert proc.returncode == 2, proc.stderr
        assert words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert (corrupt / "journal.sqlite3").read_bytes().startswith(b"this is not")  # left as it was


def test_default_state_dir_is_per_user(tmp_path: Path) -> None:
    home = tmp_path / "xdg"
    proc = _serve_fails(tmp_path, "--help")
    assert "--state-dir" in proc.stdout and "--journal-max-age" in proc.stdout
    env = {k: v for k, v in os.environ.items() if k != "ASM_NODE_STATE_DIR"}
    env["XDG_STATE_HOME"] = str(home)
    served = subprocess.Popen([sys.executable, "-m", "asm_cli", "node", "serve", "--listen", "127.0.0.1:0"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=str(tmp_path))
    try:
        assert wait_until(lambda: (home / "asm" / "node" / "journal.sqlite3").exists(), 20)
    finally:
        served.terminate()
        served.wait(15)


async def test_another_principals_journaled_run_is_denied(node_process: Callable[..., NodeProcess],
                                                          tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    alice_token, bob_token = "alice-token-0123456789", "bob-token-0123456789abc"
    tokens.write_text(f"alice:{alice_token}\nbob:{bob_token}\n")
    state, marker = tmp_path / "state", tmp_path / "marker.txt"
    args = serve_args(state, "--tokens-file", str(tokens), "--retention-runs", "0")
    node = node_process(*args)
    alice = GrpcNodeClient(RemoteNode(node.address, token=alice_token))
    request = pb.StartRunRequest(run_id="jr-alice", provider="shell", prompt=counting(marker))
    try:
        assert (await collect(alice, request))[-1].run_completed.status == "completed"
    finally:
        await alice.close()
    node.stop()
    again = node_process(*args)
    alice = GrpcNodeClient(RemoteNode(again.address, token=alice_token))
    bob = GrpcNodeClient(RemoteNode(again.address, token=bob_token))
    try:
        with pytest.raises(PermissionDenied):
            await collect(bob, request)
        with pytest.raises(PermissionDenied):
            await bob.get_run(pb.GetRunRequest(run_id="jr-alice"))
        with pytest.raises(PermissionDenied):
            await collect(bob, pb.AttachRunRequest(run_id="jr-alice"))
        assert [e.kind for e in await collect(alice, request)] == [COMPLETED]  # the owner gets the outcome
    finally:
        await alice.close()
        await bob.close()
    assert lines(marker) == 1


async def _events(stream: AsyncIterator[pb.EventBatch]) -> list[pb.Event]:
    return [ev async for batch in stream for ev in batch.events]


async def test_in_memory_journal_and_write_failures(tmp_path: Path) -> None:
    """NodeAgent() keeps its journal in memory; a failing end write is counted and the run goes on,
    a failing admission write refuses the run (nothing runs)."""
    marker = tmp_path / "marker.txt"
    agent = NodeAgent(node_config(retention_max_runs=0))
    assert agent.journal.path is None
    await agent.start()
    try:
        request = pb.StartRunRequest(run_id="jr-mem", provider="shell", prompt=counting(marker))
        first = [ev async for b in agent.start_run(request) for ev in b.events]
        assert "jr-mem" not in agent.runs  # evicted
        again = [ev async for b in agent.start_run(request) for ev in b.events]
        assert lines(marker) == 1
        assert [e.kind for e in again] == [COMPLETED] and again[0].seq == first[-1].seq
        failures = agent.metrics.journal_failures.labels("write")
        before = failures._value.get()
        # The end of a run cannot be written (the journal refuses writes): counted, and the id is
        # then lost rather than run again.
        slow = pb.StartRunRequest(run_id="jr-unended", provider="shell", prompt=counting(marker, sleep=0.5))
        frames = agent.start_run_frames(slow)  # admitted and journaled here, synchronously
        agent.journal._db.execute("PRAGMA query_only=1")
        ended = [ev async for data in frames for ev in pb.EventBatch.FromString(data).events]
        assert ended[-1].run_completed.status == "completed" and lines(marker) == 2
        assert failures._value.get() == before + 1
        with pytest.raises(AsmError) as caught:
            await _events(agent.start_run(slow))
        assert caught.value.kind == "run_lost" and "not journaled" in caught.value.message
        assert lines(marker) == 2
        agent.journal._db.execute("PRAGMA query_only=0")
        before = failures._value.get()
        agent.journal._db.execute("PRAGMA query_only=1")  # the admission cannot be recorded
        other = pb.StartRunRequest(run_id="jr-mem-2", provider="shell", prompt=counting(marker))
        with pytest.raises(NodeNotReady) as refused:
            await _events(agent.start_run(other))
        assert refused.value.reason == "journal_unavailable" and lines(marker) == 2  # never run
        assert failures._value.get() == before + 1
        agent.journal._db.execute("PRAGMA query_only=0")
    finally:
        await agent.stop()


@pytest.mark.parametrize("outcome", ["completed", "failed", "interrupted"])
async def test_session_reduces_a_journaled_outcome_like_the_run(tmp_path: Path, outcome: str) -> None:
    """Through the controller's Session and reducer: same status, exit code and error kind as the run had."""
    marker = tmp_path / "marker.txt"
    agent = NodeAgent(node_config(retention_max_runs=0, state_dir=tmp_path / "state"))
    await agent.start()
    prompt = counting(marker, exit_code=4 if outcome == "failed" else 0, sleep=30 if outcome == "interrupted" else 0)
    try:
        async with Session("shell", node=EmbeddedNode(agent)) as session:
            stream = session.stream(prompt, run_id=f"jr-{outcome}")
            async for ev in stream:
                if ev.kind == "assistant_delta" and outcome == "interrupted":
                    await session.interrupt(f"jr-{outcome}")
            first = stream.result
            assert first is not None and first.status == outcome
        async with Session("shell", node=EmbeddedNode(agent)) as session:  # a new client, same node
            again = await session.query(prompt, run_id=f"jr-{outcome}")
        assert "jr-" + outcome not in agent.runs and lines(marker) == 1
        assert (again.status, again.exit_code) == (first.status, first.exit_code)
        assert (again.error.kind if again.error else None) == (first.error.kind if first.error else None)
    finally:
        await agent.stop()


async def test_a_journaled_timeout_keeps_which_deadline_fired(tmp_path: Path) -> None:
    """A run ended by its run_timeout_ms, asked again after eviction: the same error kind AND reason."""
    marker = tmp_path / "marker.txt"
    agent = NodeAgent(node_config(retention_max_runs=0, state_dir=tmp_path / "state"))
    await agent.start()
    prompt = counting(marker, sleep=30)
    try:
        async with Session("shell", node=EmbeddedNode(agent), options={"run_timeout_ms": 300}) as session:
            first = await session.query(prompt, run_id="jr-deadline")
        assert first.error is not None and (first.error.kind, first.error.reason) == ("timeout", "run_timeout")
        async with Session("shell", node=EmbeddedNode(agent), options={"run_timeout_ms": 300}) as session:
            again = await session.query(prompt, run_id="jr-deadline")
        assert "jr-deadline" not in agent.runs and lines(marker) == 1  # answered from the journal, not run again
        assert again.error is not None and (again.error.kind, again.error.reason) == ("timeout", "run_timeout")
        assert again.status == first.status == "failed"
    finally:
        await agent.stop()


def test_a_version_1_journal_is_upgraded_in_place(tmp_path: Path) -> None:
    """A journal written before error_reason existed opens, keeps its runs, and records reasons from then on."""
    from asm_node.journal import JOURNAL_FILE, SCHEMA_VERSION, Journal

    state = tmp_path / "state"
    state.mkdir()
    db = sqlite3.connect(state / JOURNAL_FILE)
    db.executescript("""
        CREATE TABLE runs (run_id TEXT PRIMARY KEY, owner TEXT NOT NULL, session_id TEXT NOT NULL,
            provider TEXT NOT NULL, started_ns INTEGER NOT NULL, epoch TEXT NOT NULL, status TEXT NOT NULL,
            exit_code INTEGER NOT NULL DEFAULT -1, last_seq INTEGER NOT NULL DEFAULT 0,
            finished_ns INTEGER NOT NULL DEFAULT 0, error_kind TEXT NOT NULL DEFAULT '',
            error_domain TEXT NOT NULL DEFAULT '', error_message TEXT NOT NULL DEFAULT '');
        PRAGMA user_version=1;""")
    now = time.time_ns()
    db.execute("INSERT INTO runs VALUES ('old', 'o', 's', 'shell', ?, 'e0', 'failed', 3, 4, ?, 'runtime', 'runtime', "
               "'boom')", (now, now))
    db.commit()
    db.close()
    journal = Journal(state, epoch="e1", max_age_s=3600)
    try:
        old = journal.get("old")
        assert old is not None and (old.status, old.error_message, old.error_reason) == ("failed", "boom", "")
        journal.started("new", "o", "s", "shell", now)
        journal.finished("new", "failed", -1, 3, now, ("timeout", "runtime", "late", "idle_timeout"))
        new = journal.get("new")
        assert new is not None and new.error_reason == "idle_timeout"
        assert journal._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    finally:
        journal.close()
