"""Run history from a controller's registry: ListRuns filters and keyset paging, ListSessions, RunInfo's
registry fields, ``asm runs``/``asm sessions``/``asm logs`` -- a real controller on SQLite and a real node.

The registry is filled before the controller starts (25 ended runs over 3 sessions, 2 providers, 2 nodes,
2 owners, an hour apart): the controller answers the history from the store, as after any restart.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from asm_controller import ControllerClient, Event, GrpcNodeClient, RemoteNode
from asm_controller._store import RunRecord, open_store
from asm_node.testing import ServedProcess, serve_controller
from asm_wire import AsmError, pb
from tests.support.processes import ROOT, start_node_process

pytestmark = pytest.mark.slow  # controller and node processes, the CLI as a subprocess

ADMIN, ALICE = "ops-token-0123456789abcdef", "alice-token-0123456789abcdef"
TOKENS = f"ops:{ADMIN}:admin\nalice:{ALICE}\nbob:bob-token-0123456789abcdef\n"
NODES = ("10.0.0.1:7070", "10.0.0.2:7070")
NOW = time.time()
HOUR = 3600.0
GATED = """\
import os, sys, time
gate, before, after, code = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for i in range(before):
    print(f"before {i}", flush=True)
deadline = time.monotonic() + 60
while not os.path.exists(gate) and time.monotonic() < deadline:
    time.sleep(0.02)
for i in range(after):
    print(f"after {i}", flush=True)
sys.exit(code)
"""


def history_record(i: int) -> RunRecord:
    """Run i of 25: session s{i%3}, provider claude for even i, node by i%2, owner alice for i%3 == 0,
    created (25-i) hours ago; ended, with a result."""
    created = NOW - (25 - i) * HOUR
    status = "failed" if i % 5 == 0 else "completed"
    return RunRecord(
        run_id=f"run-{i:02d}", session_id=f"s{i % 3}", provider="claude" if i % 2 == 0 else "codex",
        owner="alice" if i % 3 == 0 else "bob", node_address=NODES[i % 2], status=status,
        provider_session_id=f"psid-{i}", created_at=created, ended_at=created + 60,
        result={"kind": "result_summary", "run_id": f"run-{i:02d}", "status": status, "exit_code": 1 if i % 5 == 0 else 0},
        spec={"cwd": "/srv/ws"})


def logged_events(run_id: str, session_id: str, provider: str) -> bytes:
    common = {"run_id": run_id, "session_id": session_id, "provider": provider}
    events = [Event.synthetic("run_started", **common, seq=1),
              Event.synthetic("assistant_delta", **common, seq=2, content="from the registry\n"),
              Event.synthetic("run_completed", **common, seq=3, status="completed", exit_code=0)]
    return pb.EventBatch(events=[e.pb for e in events]).SerializeToString()


async def fill(url: str) -> None:
    store = open_store(url)
    await store.open()
    try:
        for i in range(25):
            rec = history_record(i)
            await store.create(rec)
            await store.append_events(rec.run_id, 1, 3, logged_events(rec.run_id, rec.session_id, rec.provider))
    finally:
        await store.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServedProcess, ServedProcess, Path]]:
    tmp = tmp_path_factory.mktemp("history")
    url = f"sqlite:///{tmp / 'registry.sqlite3'}"
    asyncio.run(fill(url))
    (tmp / "tokens").write_text(TOKENS)
    (tmp / "admin-token").write_text(ADMIN)
    (tmp / "gated.py").write_text(GATED)
    node = start_node_process(tmp, "--shell-allow", sys.executable)
    try:
        ctl = serve_controller(tmp, "--node", node.address, "--tokens-file", str(tmp / "tokens"), "--state", url,
                               token=ADMIN)
    except BaseException:
        node.stop()
        raise
    try:
        yield node, ctl, tmp
    finally:
        ctl.stop()
        node.stop()


async def list_runs(address: str, token: str = ADMIN, **fields: Any) -> pb.ListRunsResponse:
    client = GrpcNodeClient(RemoteNode(address, token=token))
    try:
        return await client.list_runs(pb.ListRunsRequest(**fields))
    finally:
        await client.close()


async def all_pages(address: str, token: str = ADMIN, **fields: Any) -> tuple[list[str], int]:
    """Every run id over the pages (in order), and how many pages it took."""
    seen: list[str] = []
    pages, token_ = 0, ""
    while True:
        resp = await list_runs(address, token, page_token=token_, **fields)
        pages += 1
        seen += [r.run_id for r in resp.runs]
        token_ = resp.next_page_token
        if not token_:
            return seen, pages


def ids(*indexes: int) -> list[str]:
    return [f"run-{i:02d}" for i in indexes]


NEWEST_FIRST = list(range(24, -1, -1))


async def test_list_runs_pages_never_repeat_or_skip_and_filters_select(
        fleet: tuple[ServedProcess, ServedProcess, Path]) -> None:
    _, ctl, _ = fleet
    seen, pages = await all_pages(ctl.address, limit=10)
    assert (seen, pages) == (ids(*NEWEST_FIRST), 3)  # 10 + 10 + 5, newest first, each once
    first = await list_runs(ctl.address, limit=10)
    assert len(first.runs) == 10 and first.next_page_token
    last = await list_runs(ctl.address, limit=5, page_token=(await list_runs(ctl.address, limit=20)).next_page_token)
    assert [r.run_id for r in last.runs] == ids(4, 3, 2, 1, 0) and last.next_page_token == ""
    # Filters, alone and together, and paged.
    assert (await all_pages(ctl.address, limit=3, session_id="s1"))[0] == ids(*[i for i in NEWEST_FIRST if i % 3 == 1])
    assert (await all_pages(ctl.address, provider="codex"))[0] == ids(*[i for i in NEWEST_FIRST if i % 2])
    assert (await all_pages(ctl.address, node=NODES[0], status="failed"))[0] == ids(20, 10, 0)
    since, until = int((NOW - 5.5 * HOUR) * 1e9), int((NOW - 2.5 * HOUR) * 1e9)  # runs 20, 21, 22
    assert (await all_pages(ctl.address, limit=2, since_unix_nano=since, until_unix_nano=until))[0] == ids(22, 21, 20)
    assert (await all_pages(ctl.address, session_id="s0", provider="claude", since_unix_nano=since))[0] == ids(24)
    # A non-admin sees its own runs only, paged the same way.
    assert (await all_pages(ctl.address, ALICE, limit=4))[0] == ids(*[i for i in NEWEST_FIRST if i % 3 == 0])
    # The registry's fields: node, result as JSON, exit code.
    [r20] = (await list_runs(ctl.address, session_id="s2", node=NODES[0], status="failed", limit=1)).runs
    assert (r20.run_id, r20.node, r20.status, r20.exit_code) == ("run-20", NODES[0], pb.RUN_STATUS_FAILED, 1)
    assert json.loads(r20.result_json) == history_record(20).result


async def test_page_tokens_and_filters_are_checked(fleet: tuple[ServedProcess, ServedProcess, Path]) -> None:
    node, ctl, _ = fleet
    async with ControllerClient(RemoteNode(ctl.address, token=ADMIN)) as admin:
        sessions_token = (await admin.list_sessions(limit=1)).next_page_token
    forged = base64.urlsafe_b64encode(b'{"v":1,"k":"runs","at":"x","id":"run-01"}').decode()
    for bad in ("not a token!", "e30", sessions_token, forged, "A" * 5000):
        with pytest.raises(AsmError) as err:
            await list_runs(ctl.address, page_token=bad)
        assert (err.value.kind, err.value.reason) == ("config_invalid", "invalid_page_token"), bad
    with pytest.raises(AsmError) as err:
        await list_runs(ctl.address, session_id="no spaces allowed")
    assert err.value.kind == "config_invalid"
    # A node lists the runs it holds: the registry's filters are refused there, typed.
    for field, value in (("session_id", "s1"), ("since_unix_nano", 1), ("page_token", "x"), ("node", "a:1")):
        with pytest.raises(AsmError) as err:
            await list_runs(node.address, **{field: value})
        assert (err.value.kind, err.value.reason) == ("config_invalid", "controller_only"), field


async def test_list_sessions_groups_runs_paged_and_owner_filtered(
        fleet: tuple[ServedProcess, ServedProcess, Path]) -> None:
    _, ctl, _ = fleet
    async with ControllerClient(RemoteNode(ctl.address, token=ADMIN)) as admin:
        first = await admin.list_sessions(limit=2)
        rest = await admin.list_sessions(limit=2, page_token=first.next_page_token)
        assert [s.session_id for s in first.sessions] == ["s0", "s2"] and first.next_page_token
        assert [s.session_id for s in rest.sessions] == ["s1"] and rest.next_page_token == ""
        s0 = first.sessions[0]
        assert (s0.runs, s0.last_run_id, s0.last_status, s0.provider_session_id, s0.node) == (
            9, "run-24", pb.RUN_STATUS_COMPLETED, "psid-24", NODES[0])
        assert s0.first_unix_nano == int(history_record(0).created_at * 1e9)
        assert s0.last_unix_nano == int(history_record(24).created_at * 1e9)
        # Filters: only codex runs (the sessions' latest codex run); only sessions with a run on a node.
        codex = await admin.list_sessions(provider="codex")
        assert [(s.session_id, s.last_run_id, s.provider) for s in codex.sessions] == [
            ("s2", "run-23", "codex"), ("s0", "run-21", "codex"), ("s1", "run-19", "codex")]
        assert len((await admin.list_sessions(node=NODES[1])).sessions) == 3
        assert (await admin.list_sessions(node="10.9.9.9:1")).sessions == []
        with pytest.raises(AsmError) as err:
            await admin.list_sessions(page_token="garbage")
        assert err.value.reason == "invalid_page_token"
    async with ControllerClient(RemoteNode(ctl.address, token=ALICE)) as alice:
        mine = await alice.list_sessions()
        assert [(s.session_id, s.runs, s.owner) for s in mine.sessions] == [("s0", 9, "alice")]


def asm(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "asm_cli", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=str(ROOT))


def test_asm_runs_filters_and_pages(fleet: tuple[ServedProcess, ServedProcess, Path]) -> None:
    node, ctl, tmp = fleet
    auth = ("--token-file", str(tmp / "admin-token"))
    page = asm("runs", "--controller", ctl.address, "--page-size", "10", "--output", "json", *auth)
    assert page.returncode == 0, page.stderr
    rows = json.loads(page.stdout)
    assert [r["run_id"] for r in rows] == ids(*NEWEST_FIRST)[:10]
    [token] = [line.split("--page-token ", 1)[1] for line in page.stderr.splitlines() if "--page-token" in line]
    nxt = asm("runs", "--controller", ctl.address, "--page-size", "10", "--page-token", token, "--output", "json",
              *auth)
    assert nxt.returncode == 0, nxt.stderr
    assert not {r["run_id"] for r in rows} & {r["run_id"] for r in json.loads(nxt.stdout)}
    every = asm("runs", "--controller", ctl.address, "--page-size", "7", "--all", "--session", "s1",
                "--provider", "codex", "--output", "json", *auth)
    assert every.returncode == 0 and "--page-token" not in every.stderr, every.stderr
    assert [r["run_id"] for r in json.loads(every.stdout)] == ids(*[i for i in NEWEST_FIRST if i % 3 == 1 and i % 2])
    # --since as a span back from now, --until as an ISO time (UTC), --node-address: the registry's node.
    until = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(NOW - 1.5 * HOUR))
    window = asm("runs", "--controller", ctl.address, "--since", "270m", "--until", until, "--node-address", NODES[1],
                 "--output", "json", *auth)
    assert window.returncode == 0, window.stderr
    assert [r["run_id"] for r in json.loads(window.stdout)] == ids(23, 21)
    text = asm("runs", "--controller", ctl.address, "--session", "s2", "--page-size", "2", *auth)
    assert text.returncode == 0 and "run-23" in text.stdout and "asm: more runs: --page-token" in text.stderr
    # Typed usage errors, exit 2, one line: a bad token, a bad time, a registry filter on a node.
    for args in (("--controller", ctl.address, "--page-token", "nope"), ("--controller", ctl.address, "--since", "x"),
                 ("--node", node.address, "--session", "s1")):
        bad = asm("runs", *args, *auth)
        assert bad.returncode == 2 and bad.stderr.startswith("asm: error:") and "Traceback" not in bad.stderr, args


def test_asm_sessions_from_the_registry(fleet: tuple[ServedProcess, ServedProcess, Path]) -> None:
    _, ctl, tmp = fleet
    auth = ("--token-file", str(tmp / "admin-token"))
    out = asm("sessions", "--controller", ctl.address, "--provider", "claude", "--output", "json", *auth)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [(r["session_id"], r["last_run_id"], r["provider_session_id"]) for r in rows[:3]] == [
        ("s0", "run-24", "psid-24"), ("s1", "run-22", "psid-22"), ("s2", "run-20", "psid-20")]
    paged = asm("sessions", "--controller", ctl.address, "--page-size", "1", "--node", NODES[1], *auth)
    assert paged.returncode == 0 and paged.stdout.startswith("SESSION") and "--page-token" in paged.stderr
    every = asm("sessions", "--controller", ctl.address, "--page-size", "1", "--all", "--output", "json", *auth)
    assert every.returncode == 0 and len(json.loads(every.stdout)) >= 3, every.stderr
    bad = asm("sessions", "--controller", ctl.address, "--page-token", "zzz", *auth)
    assert bad.returncode == 2 and "page_token" in bad.stderr and "Traceback" not in bad.stderr


def test_asm_logs_of_a_run_the_registry_holds(fleet: tuple[ServedProcess, ServedProcess, Path]) -> None:
    _, ctl, tmp = fleet
    auth = ("--token-file", str(tmp / "admin-token"))
    logs = asm("logs", "run-07", "--controller", ctl.address, "--output", "jsonl", *auth)
    assert logs.returncode == 0, logs.stderr
    lines = [json.loads(line) for line in logs.stdout.splitlines()]
    assert [(e["seq"], e["kind"]) for e in lines[:-1]] == [(1, "run_started"), (2, "assistant_delta"),
                                                           (3, "run_completed")]
    assert lines[-1]["kind"] == "result_summary" and lines[-1]["text"] == "from the registry\n"
    text = asm("logs", "run-07", "--controller", ctl.address, "--after-seq", "1", *auth)
    assert (text.returncode, text.stdout) == (0, "from the registry\n"), text.stderr
    unknown = asm("logs", "run-99", "--controller", ctl.address, *auth)
    assert unknown.returncode == 5 and "Traceback" not in unknown.stderr


def _wait_lines(proc: subprocess.Popen[bytes], n: int, timeout: float = 30.0) -> bytes:
    assert proc.stdout is not None
    buf, deadline = b"", time.monotonic() + timeout
    while buf.count(b"\n") < n:
        left = deadline - time.monotonic()
        assert left > 0, buf
        if select.select([proc.stdout], [], [], left)[0]:
            chunk = os.read(proc.stdout.fileno(), 65536)
            assert chunk, buf
            buf += chunk
    return buf


def test_asm_logs_prints_what_is_logged_then_exits_and_follow_goes_on_to_the_end(
        fleet: tuple[ServedProcess, ServedProcess, Path]) -> None:
    _, ctl, tmp = fleet
    auth = ("--token-file", str(tmp / "admin-token"))
    gate = tmp / "gate-logs"
    prompt = f"{sys.executable} {tmp / 'gated.py'} {gate} 3 2 1"
    run = subprocess.Popen([sys.executable, "-m", "asm_cli", "run", "--controller", ctl.address, "--provider", "shell",
                            "--run-id", "live-logs", "--output", "jsonl", *auth, prompt],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(ROOT))
    follow: subprocess.Popen[bytes] | None = None
    try:
        _wait_lines(run, 4)  # run_started and 3 deltas: the run waits at its gate
        now = asm("logs", "live-logs", "--controller", ctl.address, "--output", "jsonl", *auth, timeout=30)
        assert now.returncode == 0, now.stderr
        got = [json.loads(line) for line in now.stdout.splitlines()]
        assert [e["seq"] for e in got] == [1, 2, 3, 4] and got[-1]["payload"]["content"] == "before 2\n"
        assert "still running" in now.stderr and "--follow --after-seq 4" in now.stderr
        follow = subprocess.Popen([sys.executable, "-m", "asm_cli", "logs", "live-logs", "--controller", ctl.address,
                                   "--follow", "--after-seq", "2", "--output", "jsonl", *auth],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(ROOT))
        early = _wait_lines(follow, 2)
        gate.touch()  # the run was not disturbed by the read: it goes on and ends (exit 1)
        run_out, run_err = run.communicate(timeout=60)
        out, err = follow.communicate(timeout=60)
        out = early + out
        assert run.returncode == 1, run_err
        assert follow.returncode == 1, err  # --follow: the run's outcome, as asm attach
        followed = [json.loads(line) for line in out.splitlines()]
        ran = [json.loads(line) for line in run_out.splitlines()[-4:]]
        assert followed[0]["seq"] == 3 and followed[-1]["kind"] == "result_summary"
        assert [e["payload"]["content"] for e in followed if e["kind"] == "assistant_delta"] == [
            "before 1\n", "before 2\n", "after 0\n", "after 1\n"]
        assert ran[-1]["status"] == followed[-1]["status"] == "failed"
        # Ended now: without --follow its whole log and summary, exit 0 (the logs were printed).
        done = asm("logs", "live-logs", "--controller", ctl.address, "--output", "jsonl", *auth)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout.splitlines()[-1])["status"] == "failed"
    finally:
        for proc in (run, follow):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.communicate()


def test_asm_logs_on_a_node(fleet: tuple[ServedProcess, ServedProcess, Path]) -> None:
    node, _, _ = fleet
    ran = asm("run", "--node", node.address, "--provider", "shell", "--run-id", "node-logs", "--output", "jsonl",
              "echo on the node")
    assert ran.returncode == 0, ran.stderr
    logs = asm("logs", "node-logs", "--node", node.address, "--output", "jsonl")
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout.splitlines() and [json.loads(line)["kind"] for line in logs.stdout.splitlines()] == [
        json.loads(line)["kind"] for line in ran.stdout.splitlines()]


def test_run_info_carries_the_registry_fields_it_has() -> None:
    """Store v2's fields (priority, queued_at, lease_owner) when the record has them; defaults when not."""
    from asm_controller.service import run_info

    rec = history_record(3)
    plain = run_info(rec)
    assert (plain.priority, plain.queued_unix_nano, plain.replica) == (0, 0, "")
    assert json.loads(plain.result_json) == rec.result and plain.exit_code == 0
    for name, value in (("priority", 7), ("queued_at", 1000.5), ("lease_owner", "replica-a")):
        setattr(rec, name, value)
    info = run_info(rec)
    assert (info.priority, info.queued_unix_nano, info.replica) == (7, 1_000_500_000_000, "replica-a")
    rec.result = None
    assert run_info(rec).result_json == ""


async def test_runs_through_a_controller_keep_the_session_their_client_names(tmp_path: Path) -> None:
    """A client's StartRun.session_id is the run's session in the registry (not the controller's own)."""
    node = start_node_process(tmp_path, "--shell-allow", "true")
    try:
        ctl = serve_controller(tmp_path, "--node", node.address, "--state", "memory:")
        try:
            client = GrpcNodeClient(RemoteNode(ctl.address))
            try:
                for run_id, session in (("a1", "client-s1"), ("a2", "client-s1"), ("b1", "client-s2")):
                    batches = [b async for b in client.start_run(pb.StartRunRequest(
                        run_id=run_id, session_id=session, provider="shell", prompt="true"))]
                    assert {m.session_id for b in batches for m in b.events} == {session}
                in_s1 = await client.list_runs(pb.ListRunsRequest(session_id="client-s1"))
                with pytest.raises(AsmError) as bad:
                    await anext(aiter(client.start_run(pb.StartRunRequest(
                        run_id="c1", session_id="not a valid id!", provider="shell", prompt="true"))))
            finally:
                await client.close()
            controller = ControllerClient(RemoteNode(ctl.address))
            try:
                sessions = await controller.list_sessions()
            finally:
                await controller.close()
        finally:
            ctl.stop()
    finally:
        node.stop()
    assert sorted(r.run_id for r in in_s1.runs) == ["a1", "a2"]
    assert {s.session_id: s.runs for s in sessions.sessions} == {"client-s1": 2, "client-s2": 1}
    assert bad.value.kind == "config_invalid"
