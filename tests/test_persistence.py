"""Persistence: stores, the on-disk format and its crash safety, the async writer, replay == live."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import pytest

from asm_controller import Event, EventReducer, Result
from asm_controller.extensions import persistence
from asm_controller.extensions.persistence import (
    AsyncWriter,
    EventStore,
    FileStore,
    MemoryStore,
    open_recorder,
    rebuild_run,
    record_events,
    replay_file,
    replay_session,
)
from asm_node.providers import AmpProvider, ClaudeProvider, CodexProvider, GeminiProvider, RunSpec
from asm_node.providers._cli import CliProvider
from asm_node.providers.base import ExitInfo
from asm_wire import KIND_NAMES, AsmError, ConfigError, RunNotFound, pb

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "cli"  # recorded by scripts/record_fixtures.py: no test reads outside the repo
T0 = 1_700_000_000_000_000_000


def mk(kind: str, seq: int, run: str = "r1", session: str = "s1", provider: str = "claude", eid: str | None = None,
       **payload: Any) -> Event:
    msg = pb.Event(id=f"{run}:{seq}" if eid is None else eid, run_id=run, session_id=session, provider=provider,
                   kind=pb.EventKind.Value("EVENT_KIND_" + kind.upper()), seq=seq,
                   timestamp_unix_nano=T0 + seq * 1_000_000)
    if kind != "unspecified":
        getattr(msg, kind).CopyFrom(getattr(pb, "".join(p.title() for p in kind.split("_")))(**payload))
    return Event(msg)


def every_kind() -> list[Event]:
    blocks = [pb.ContentBlock(type="text", text="Héllo ✓\nline two"),
              pb.ContentBlock(type="tool_use", json='{"id":"t1","input":{"n":1}}')]
    evs = [
        mk("unspecified", 1),
        mk("run_started", 2, provider_session_id="psid-1", command="claude", args=["-p", "hi there"], cwd="/tmp",
           pid=2**31 - 1),
        mk("assistant_delta", 3, content="Hel\x00lo ", index=3, format="text"),
        mk("assistant_message", 4, content=blocks, role="assistant", model="sonnet", message_id="msg_1"),
        mk("user_message", 5, content=blocks[:1], role="user"),
        mk("thinking", 6, content="hmm…", signature="sig=="),
        mk("tool_use", 7, tool_name="Bash", tool_call_id="t1", input_json='{"command":"echo \\"hi\\""}'),
        mk("tool_result", 8, tool_call_id="t1", content_json='"hi\\n"', is_error=True),
        mk("approval_requested", 9, approval_id="a1", subject="Bash", details_json='{"x":[1,2]}'),
        mk("approval_resolved", 10, approval_id="a1", decision="deny", reason="nope"),
        mk("cost_update", 11, input_tokens=2**40 + 1, output_tokens=2**62 + 3, total_tokens=2**63 - 1,
           cost_usd=0.1 + 0.2),
        mk("result", 12, status="completed", stop_reason="end_turn", output_json='{"usage":{"input_tokens":9}}'),
        mk("error", 13, message="slow down", code="rate_limit", severity=pb.SEVERITY_WARNING, domain="provider",
           exit_code=-1),
        mk("stderr", 14, content="warn: ünïcode \t tab"),
        mk("raw", 15, stream="stdout", content='{"type":"mystery"}'),
        mk("run_completed", 16, status="completed", exit_code=-1, signal=9, duration_ms=2**40 + 7),
        mk("provider_init", 17, model="sonnet", tools=["Bash", "Read"], cwd="/w", permission_mode="default",
           mcp_servers=[pb.McpServerStatus(name="docs", status="connected")], cli_version="2.1.197",
           details_json='{"apiKeySource":"none"}'),
        mk("guardrail_triggered", 18, rule="tool_deny", direction="input", action="warn", message="m",
           details_json="{}"),
    ]
    last = evs[-1].pb
    last.metadata["origin"] = "pipeline"
    last.metadata["causation_id"] = "r1:7"
    last.provider_session_id = "psid-1"
    evs[1].pb.timestamp_unix_nano = 2**63 - 1  # int64 extremes survive
    evs[2].pb.timestamp_unix_nano = -(2**63)
    evs[3].pb.seq = 2**64 - 1  # uint64 too
    return evs


def wire(events: Iterable[Event]) -> list[bytes]:
    return [e.pb.SerializeToString(deterministic=True) for e in events]


@pytest.fixture(params=["memory", "file"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[EventStore]:
    s: EventStore = MemoryStore() if request.param == "memory" else FileStore(tmp_path / "ev.jsonl", fsync="never")
    yield s
    await s.close()


# -- format and round trip ------------------------------------------------------------


async def test_every_kind_round_trips_exactly_through_the_file(tmp_path: Path) -> None:
    evs = every_kind()
    assert {KIND_NAMES[e.pb.kind] for e in evs} == set(KIND_NAMES)
    # A newer node's event: an unknown field and an enum value this wire does not know.
    future = pb.Event.FromString(mk("error", 19, message="x").pb.SerializeToString() + bytes([0xF8, 0x06, 0x2A]))
    future.error.severity = 7  # type: ignore[assignment]
    future.kind = 42  # type: ignore[assignment]
    evs.append(Event(future))
    path = tmp_path / "events.jsonl"
    async with FileStore(path) as fs:
        assert await fs.append(evs) == len(evs)
    async with FileStore(path) as again:
        loaded = await again.list_events()
        assert again.recovered is None
    assert [e.pb for e in loaded] == [e.pb for e in evs]
    assert wire(loaded) == wire(evs)
    assert b"\xf8\x06\x2a" in loaded[-1].pb.SerializeToString()  # the unknown field is still there
    assert loaded[-1].pb.kind == 42 and loaded[-1].pb.error.severity == 7
    assert loaded[10].pb.cost_update.output_tokens == 2**62 + 3 and loaded[12].pb.error.severity == pb.SEVERITY_WARNING
    # The readable header of every line.
    lines = path.read_bytes().splitlines()
    assert len(lines) == len(evs)
    head = json.loads(lines[10])
    assert head["v"] == 1 and head["kind"] == "cost_update" and head["session_id"] == "s1"
    assert head["id"] == "r1:11" and head["seq"] == 11 and head["ts"] == T0 + 11_000_000
    assert json.loads(lines[-1])["kind"] == "42"


async def test_file_io_runs_off_the_event_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    threads: set[str] = set()
    real_write = os.write

    def spy(fd: int, data: Any) -> int:
        threads.add(threading.current_thread().name)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", spy)
    async with FileStore(tmp_path / "e.jsonl") as fs:
        await fs.append([mk("assistant_delta", 1, content="x")])
    assert threads and all(t.startswith("asm-filestore") for t in threads)


@pytest.mark.parametrize(("mode", "syncs_after_append"), [("always", 1), ("batch", 0), ("never", 0)])
async def test_fsync_modes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, syncs_after_append: int) -> None:
    calls: list[int] = []
    monkeypatch.setattr(persistence._file, "_datasync", lambda fd: calls.append(fd))  # where FileStore looks it up
    fs = FileStore(tmp_path / "e.jsonl", fsync=mode, fsync_interval=0.05)
    await fs.append([mk("assistant_delta", 1, content="x"), mk("assistant_delta", 2, content="y")])
    assert len(calls) == syncs_after_append  # one fsync per append call, not per event
    await asyncio.sleep(0.2)
    assert len(calls) == (1 if mode in ("always", "batch") else 0)  # batch: synced within the interval
    await fs.append([mk("assistant_delta", 3, content="z")])
    await fs.close()
    assert len(calls) == {"always": 2, "batch": 2, "never": 0}[mode]  # batch: the rest on close


# -- idempotency ----------------------------------------------------------------------------


async def test_append_is_idempotent_per_session(store: EventStore) -> None:
    e1 = mk("assistant_delta", 1, content="first")
    e1_again = mk("assistant_delta", 1, content="second")  # same id, other payload
    e2 = mk("assistant_delta", 2, content="two")
    assert await store.append([e1, e1_again, e2]) == 2
    assert await store.append([e1, e2]) == 0
    assert [e.pb.assistant_delta.content for e in await store.list_events("s1")] == ["first", "two"]
    # The same id in another session is another event (ASM's global id set would drop it).
    other = mk("assistant_delta", 1, session="s2", content="other session")
    assert await store.append([other]) == 1
    assert await store.sessions() == ["s1", "s2"]
    assert [e.id for e in await store.list_events()] == ["r1:1", "r1:2", "r1:1"]
    assert [e.session_id for e in await store.list_events(run_id="r1")] == ["s1", "s1", "s2"]
    assert await store.list_events("nobody") == []
    assert await store.runs("s1") == ["r1"] and await store.runs() == ["r1"]
    # An event without an id is keyed by run_id:seq.
    anon = mk("assistant_delta", 9, eid="", content="anon")
    assert await store.append([anon, anon]) == 1
    # reset forgets the session's events and ids; the other session is untouched.
    assert await store.reset_session("s1") == 3
    assert await store.list_events("s1") == []
    assert [e.pb.assistant_delta.content for e in await store.list_events("s2")] == ["other session"]
    assert await store.append([e1_again]) == 1
    assert [e.pb.assistant_delta.content for e in await store.list_events("s1")] == ["second"]


async def test_stored_events_are_copies(store: EventStore) -> None:
    ev = mk("assistant_delta", 1, content="before")
    await store.append([ev])
    ev.pb.assistant_delta.content = "mutated later by the caller"
    assert (await store.list_events())[0].pb.assistant_delta.content == "before"


async def test_file_store_reset_and_dedup_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    async with FileStore(path) as fs:
        await fs.append([mk("assistant_delta", i, session=s, content=f"{s}{i}") for s in ("a", "b") for i in (1, 2)])
        assert await fs.reset_session("a") == 2
        await fs.append([mk("assistant_delta", 3, session="b", content="b3")])
    assert not [p for p in os.listdir(tmp_path) if ".tmp." in p]
    async with FileStore(path) as fs:
        assert await fs.sessions() == ["b"]
        assert [e.pb.assistant_delta.content for e in await fs.list_events()] == ["b1", "b2", "b3"]
        assert await fs.append([mk("assistant_delta", 1, session="b", content="dup")]) == 0


# -- locking and read-only -----------------------------------------------------------------


async def test_second_writer_is_refused_while_readers_are_not(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    async with FileStore(path) as fs:
        await fs.append([mk("assistant_delta", 1, content="x")])
        with pytest.raises(AsmError) as exc:
            await FileStore(path).open()
        assert exc.value.reason == "store_locked" and exc.value.kind == "transport_busy"
        async with FileStore(path, readonly=True) as ro:
            assert len(await ro.list_events()) == 1
            with pytest.raises(ConfigError):
                await ro.append([mk("assistant_delta", 2, content="y")])
    async with FileStore(path) as fs2:  # released on close
        assert len(await fs2.list_events()) == 1


def test_another_process_cannot_append_while_the_store_is_open(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    code = ("import asyncio, sys\nfrom asm_controller.extensions.persistence import FileStore\n"
            "async def main():\n    await FileStore(sys.argv[1]).open()\n"
            "try:\n    asyncio.run(main())\nexcept Exception as e:\n    print(getattr(e, 'reason', e)); sys.exit(3)\n")

    async def hold() -> None:
        async with FileStore(path):
            proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, str(path), cwd=REPO,
                                                        stdout=subprocess.PIPE)
            out, _ = await proc.communicate()
            assert proc.returncode == 3 and out.strip() == b"store_locked"

    asyncio.run(hold())


# -- crash safety ---------------------------------------------------------------------------

CHILD = r'''
import asyncio, os, random, signal, sys, time
from asm_controller import Event
from asm_controller.extensions.persistence import FileStore
from asm_wire import pb

TEAR_AT = int(sys.argv[3]) if len(sys.argv) > 3 else 0
if TEAR_AT:  # die for real halfway through writing the TEAR_AT-th line
    real_write, lines = os.write, [0]
    def tearing_write(fd, data):
        if bytes(data[:6]) == b'{"v":1':
            lines[0] += 1
            if lines[0] == TEAR_AT:
                real_write(fd, bytes(data[: len(data) // 2]))
                os.kill(os.getpid(), signal.SIGKILL)
        return real_write(fd, data)
    os.write = tearing_write

async def main(path, prefix):
    store = FileStore(path, fsync="always", lock_timeout=10)
    await store.open()
    rnd = random.Random(prefix)
    out = sys.stdout
    i = 0
    while True:
        i += 1
        eid = f"{prefix}:{i}"
        # Small events first, then big ones: a kill after 200 acks lands during a long append.
        size = rnd.choice((1, 50, 2_000, 20_000)) if i <= 200 else 2_000_000 + rnd.randrange(4_000_000)
        m = pb.Event(id=eid, run_id=prefix, session_id="crash", provider="shell",
                     kind=pb.EVENT_KIND_ASSISTANT_DELTA, seq=i, timestamp_unix_nano=time.time_ns(),
                     assistant_delta=pb.AssistantDelta(content="x" * size))
        await store.append([Event(m)])
        out.write(eid + "\n")
        out.flush()

asyncio.run(main(sys.argv[1], sys.argv[2]))
'''


@pytest.mark.slow
def test_sigkill_mid_write_loses_no_acknowledged_event_and_the_store_reopens(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    path = tmp_path / "crash.jsonl"
    rnd = random.Random()
    acked: set[str] = set()
    truncations = 0
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for round_ in range(5):
        proc = subprocess.Popen([sys.executable, str(script), str(path), f"k{round_}"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, cwd=REPO)
        assert proc.stdout is not None
        want = 200 + rnd.randrange(3)
        got = 0
        while got < want:
            line = proc.stdout.readline()
            if not line:
                proc.wait()
                pytest.fail(f"child exited early: {proc.stderr.read().decode() if proc.stderr else ''}")
            acked.add(line.decode().strip())
            got += 1
        time.sleep(rnd.uniform(0, 0.05))  # a random moment: encoding, write(2), fsync or printing the ack
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        rest = proc.stdout.read()
        acked.update(x.decode() for x in rest.split(b"\n")[:-1])  # only complete lines were acknowledged
        proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()

        async def check() -> bool:
            async with FileStore(path) as fs:
                ids = {e.id for e in await fs.list_events("crash")}
                report = fs.recovered
            missing = acked - ids
            assert not missing, f"acknowledged events lost: {sorted(missing)[:5]}"
            data = path.read_bytes()
            assert data.endswith(b"\n")
            if report is not None:
                assert report.truncated and report.skipped_lines == 0 and report.tail_lines == 1
                assert len(data) == report.truncated_at
            async with FileStore(path) as clean:  # a second open finds nothing left to repair
                assert clean.recovered is None
            return report is not None

        truncations += asyncio.run(check())
    print(f"torn tails repaired: {truncations}/5, acknowledged events: {len(acked)}")


def test_a_process_dying_halfway_through_a_line_leaves_a_tail_that_is_cut(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    path = tmp_path / "torn.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, str(script), str(path), "t", "50"], capture_output=True, env=env, cwd=REPO,
                         timeout=60)
    assert run.returncode == -signal.SIGKILL, run.stderr.decode()
    acked = run.stdout.decode().split()
    assert acked == [f"t:{i}" for i in range(1, 50)]
    assert not path.read_bytes().endswith(b"\n")

    async def check() -> None:
        async with FileStore(path) as fs:
            assert [e.id for e in await fs.list_events()] == acked
            report = fs.recovered
            assert report is not None and report.truncated and report.tail_lines == 1
            assert "unterminated" in report.problems[0].reason
        assert path.read_bytes().endswith(b"\n") and path.stat().st_size == report.truncated_at

    asyncio.run(check())


async def test_torn_tail_is_truncated_and_middle_damage_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "e.jsonl"
    async with FileStore(path) as fs:
        await fs.append([mk("assistant_delta", i, content=f"d{i}") for i in range(1, 11)])
    lines = path.read_bytes().splitlines(keepends=True)
    bad_crc = json.loads(lines[4])
    bad_crc["crc"] += 1
    lines[2] = b'{"v":1,"session_id":"s1","pb":"AAA\n'  # torn, then written over
    lines[4] = json.dumps(bad_crc).encode() + b"\n"
    lines.insert(7, b'{"v":2,"something":"from a newer asm"}\n')
    good_size = sum(map(len, lines))
    path.write_bytes(b"".join(lines) + b"\x00\x00 garbage\n" + lines[0][:40])
    caplog.set_level(logging.WARNING, "asm_controller.persistence")
    async with FileStore(path) as fs:
        contents = [e.pb.assistant_delta.content for e in await fs.list_events()]
        report = fs.recovered
        assert report is not None
        await fs.append([mk("assistant_delta", 11, content="d11")])
    assert contents == ["d1", "d2", "d4", "d6", "d7", "d8", "d9", "d10"]
    assert (report.skipped_lines, report.tail_lines, report.future_lines) == (2, 2, 1)
    assert report.truncated and report.truncated_at == good_size and report.tail_bytes == 11 + 40
    assert [(p.line, p.where) for p in report.problems] == [(3, "middle"), (5, "middle"), (8, "middle"),
                                                            (12, "tail"), (13, "tail")]
    assert "invalid JSON" in report.problems[0].reason and "checksum" in report.problems[1].reason
    assert "truncated at byte" in caplog.text and "skipped in the middle" in caplog.text
    data = path.read_bytes()
    assert data.startswith(b"".join(lines)) and data.endswith(b"\n") and b"garbage" not in data
    async with FileStore(path) as fs:  # middle damage is still reported, the tail is clean now
        assert fs.recovered is not None and fs.recovered.tail_lines == 0 and fs.recovered.skipped_lines == 2
        assert (await fs.list_events())[-1].pb.assistant_delta.content == "d11"
        await fs.reset_session("nobody")  # no-op: nothing rewritten
        await fs.append([mk("assistant_delta", 1, session="other", content="o")])
        await fs.reset_session("other")  # a rewrite drops the skipped lines, keeps the newer-format one
    async with FileStore(path) as fs:
        assert fs.recovered is not None and fs.recovered.skipped_lines == 0 and fs.recovered.future_lines == 1
        assert len(await fs.list_events()) == 9
    path.write_bytes(path.read_bytes().replace(b'{"v":2', b'{"v":1,"x', 1))  # now damaged in the middle
    async with FileStore(path) as fs:
        assert fs.recovered is not None and fs.recovered.skipped_lines == 1
        await fs.compact()
    async with FileStore(path) as fs:
        assert fs.recovered is None and len(await fs.list_events()) == 9


async def test_readonly_open_reports_a_torn_tail_without_cutting_it(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    await record_events(path, [mk("assistant_delta", 1, content="x")])
    with path.open("ab") as f:
        f.write(b'{"v":1,"sess')
    size = path.stat().st_size
    async with FileStore(path, readonly=True) as ro:
        assert len(await ro.list_events()) == 1
        assert ro.recovered is not None and not ro.recovered.truncated and ro.recovered.tail_lines == 1
    assert path.stat().st_size == size


async def test_a_failed_write_leaves_no_half_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "e.jsonl"
    fs = FileStore(path)
    await fs.append([mk("assistant_delta", 1, content="ok")])
    real_write = os.write

    def half_then_enospc(fd: int, data: Any) -> int:
        if len(data) > 100:
            real_write(fd, bytes(data[:50]))
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", half_then_enospc)
    with pytest.raises(AsmError) as exc:
        await fs.append([mk("assistant_delta", 2, content="y" * 500)])
    assert exc.value.reason == "store_write_failed" and "No space left" in exc.value.message
    monkeypatch.setattr(os, "write", real_write)
    assert await fs.append([mk("assistant_delta", 2, content="y")]) == 1  # not marked as stored before
    # When even the undo fails, the store stops appending until compact() rewrites it.
    real_truncate = os.ftruncate
    monkeypatch.setattr(os, "write", half_then_enospc)
    monkeypatch.setattr(os, "ftruncate", lambda fd, n: (_ for _ in ()).throw(OSError(5, "I/O error")))
    with pytest.raises(AsmError):
        await fs.append([mk("assistant_delta", 3, content="z" * 500)])
    monkeypatch.setattr(os, "write", real_write)
    monkeypatch.setattr(os, "ftruncate", real_truncate)
    with pytest.raises(AsmError) as exc:
        await fs.append([mk("assistant_delta", 3, content="z")])
    assert exc.value.reason == "store_broken"
    await fs.compact()
    assert await fs.append([mk("assistant_delta", 3, content="z")]) == 1
    await fs.close()
    async with FileStore(path) as again:
        assert again.recovered is None and len(await again.list_events()) == 3


# -- AsyncWriter ----------------------------------------------------------------------------


class SlowStore(MemoryStore):
    def __init__(self, delay: float, fail_first: int = 0, always_fail: bool = False) -> None:
        super().__init__()
        self.delay, self.fail_first, self.always_fail = delay, fail_first, always_fail
        self.calls = 0
        self.stored = 0
        self.syncs = 0

    async def append(self, events: Iterable[Event]) -> int:
        events = list(events)
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.always_fail or self.calls <= self.fail_first:
            raise OSError(5, "Input/output error")
        n = await super().append(events)
        self.stored += n
        return n

    async def sync(self) -> None:
        self.syncs += 1


def many(n: int, run: str = "r1") -> list[Event]:
    return [mk("assistant_delta", i, run=run, content="x") for i in range(1, n + 1)]


@pytest.mark.slow
@pytest.mark.parametrize("overflow", ["drop_newest", "drop_oldest"])
async def test_writer_never_blocks_the_producer_and_drops_by_policy(overflow: str) -> None:
    n, delay, batch = 100_000, 0.05, 500
    store = SlowStore(delay)
    writer = AsyncWriter(store, queue_size=10_000, overflow=overflow, batch_size=batch, retries=0)
    events = many(n)
    t0 = time.perf_counter()
    for i, ev in enumerate(events):
        writer.enqueue(ev)
        if i % 1000 == 0:
            await asyncio.sleep(0)  # the run path yields now and then, so the writer does run meanwhile
    elapsed = time.perf_counter() - t0
    stored_meanwhile, calls_meanwhile = store.stored, store.calls
    # Storing everything would take n / batch * delay = 10 s; the producer took a small fraction of that,
    # while the store managed about one batch per `delay`.
    assert elapsed < 2.0 and elapsed < (n / batch) * delay / 5
    assert 1 <= calls_meanwhile <= elapsed / delay + 2 and stored_meanwhile < n / 10
    # At most the queue plus the batches taken meanwhile were accepted; the rest was dropped.
    assert writer.dropped >= n - 10_000 - batch * (calls_meanwhile + 1)
    if overflow == "drop_newest":
        assert writer.enqueued + writer.dropped == n
    else:
        assert writer.enqueued == n
    await writer.flush(timeout=30)
    ids = [e.pb.seq for e in await store.list_events()]
    assert len(ids) == n - writer.dropped == writer.written and ids == sorted(ids) and store.syncs >= 1
    if overflow == "drop_newest":
        assert ids[0] == 1 and n not in ids  # the first ones were kept, the latest dropped
    else:
        assert ids[-10_000:] == list(range(n - 9_999, n + 1))  # the latest 10k were kept
    await writer.close()


@pytest.mark.slow
async def test_writer_block_policy_applies_back_pressure_without_loss() -> None:
    store = SlowStore(0.01)
    writer = AsyncWriter(store, queue_size=1000, overflow="block", batch_size=200)
    t0 = time.perf_counter()
    for ev in many(5000):
        await writer.put(ev)
    elapsed = time.perf_counter() - t0
    assert writer.dropped == 0 and elapsed > 0.1  # the producer waited for the store
    await writer.flush()
    assert len(await store.list_events()) == 5000
    # The synchronous form cannot wait: on a full queue it drops (and counts).
    slow = AsyncWriter(SlowStore(0.5), queue_size=10, overflow="block")
    accepted = sum(slow.enqueue(ev) for ev in many(30, run="r2"))
    assert slow.dropped == 30 - accepted and accepted >= 10
    await slow.close()
    await writer.close()


async def test_writer_retries_then_reports_errors_without_raising_on_the_run_path() -> None:
    flaky = SlowStore(0, fail_first=2)
    writer = AsyncWriter(flaky, retries=3, retry_backoff=0.001)
    writer(many(10))  # the observer form
    await writer.flush()
    assert writer.failed == 0 and not writer.errors and len(await flaky.list_events()) == 10

    seen: list[tuple[AsmError, int]] = []
    broken = SlowStore(0, always_fail=True)
    w2 = AsyncWriter(broken, retries=1, retry_backoff=0.001, on_error=lambda err, evs: seen.append((err, len(evs))))
    for ev in many(7):
        assert w2.enqueue(ev)  # the run path never sees the failure
    with pytest.raises(AsmError) as exc:
        await w2.flush()
    assert exc.value.reason == "persistence_write_failed" and "7 event(s)" in exc.value.message
    assert w2.failed == 7 and len(w2.errors) == 1 and w2.errors[0].reason == "store_write_failed"
    assert seen and seen[0][1] == 7 and broken.calls == 2
    await w2.flush()  # already reported: a later flush is clean
    await w2.close()
    assert not w2.enqueue(many(1)[0]) and w2.dropped == 1  # closed: dropped, counted


async def test_writer_into_a_file_store_and_the_recorder(tmp_path: Path) -> None:
    path = tmp_path / "rec.jsonl"
    writer = await open_recorder(path)
    for ev in many(300):
        await writer.put(ev)
    await writer.flush()
    async with FileStore(path, readonly=True) as ro:  # durable and readable while the recorder is open
        assert len(await ro.list_events()) == 300
    writer(many(5, run="r2"))
    await writer.close()
    assert writer.written == 305 and writer.stats()["queued"] == 0
    async with FileStore(path) as fs:  # the recorder closed its store (lock released)
        assert await fs.runs() == ["r1", "r2"]


# -- replay == live -------------------------------------------------------------------------

PROVIDERS: dict[str, CliProvider] = {
    "claude": ClaudeProvider(), "codex": CodexProvider(), "gemini": GeminiProvider(), "amp": AmpProvider(),
}


def live(provider: str, lines: list[bytes], run_id: str, exit_code: int = 0, stderr: str = "") -> tuple[list[Event], Result]:
    """The node's real parser, stamped as the node stamps events, reduced as the controller does."""
    p = PROVIDERS[provider]
    spec = RunSpec(run_id=run_id, session_id="s-live", provider=provider, prompt="hi", cwd="/tmp",
                   permission_mode="default", options=p.validate_options({}, "default"), env=dict(os.environ))
    parser = p.new_parser(spec)
    out: list[pb.Event] = []
    parser.feed_lines(lines, out)
    out += parser.finish(ExitInfo(returncode=exit_code, signal=0, stderr_tail=stderr))
    out.append(pb.Event(kind=pb.EVENT_KIND_RUN_COMPLETED,
                        run_completed=pb.RunCompleted(status="failed" if parser.failed else "completed",
                                                      exit_code=exit_code)))
    reducer = EventReducer(run_id, "s-live", provider)
    events = []
    for seq, m in enumerate(out, 1):
        m.id, m.run_id, m.session_id, m.provider, m.seq = f"{run_id}:{seq}", run_id, "s-live", provider, seq
        m.timestamp_unix_nano = T0 + seq * 1_234_567 + seq * seq * 10_000_000
        if parser.provider_session_id:
            m.provider_session_id = parser.provider_session_id
        ev = Event(m)
        assert reducer.apply(ev)
        events.append(ev)
    return events, reducer.result()


CASES: list[tuple[str, str, list[bytes], int, str]] = [
    (f.stem, f.name.split("_")[0], f.read_bytes().splitlines(), 0, "") for f in sorted(FIXTURES.glob("*.jsonl"))
]
CASES += [
    ("gemini_crash", "gemini", [], 244, "Error: 500 Internal"),
    ("claude_api_error", "claude", [
        json.dumps({"type": "assistant", "message": {"id": "x", "content": [{"type": "text", "text": "API Error: 429"}]}}).encode(),
        json.dumps({"type": "result", "subtype": "success", "is_error": True, "api_error_status": 429,
                    "result": "API Error: 429 slow down"}).encode()], 1, ""),
    ("codex_auth", "codex", [b'{"type":"thread.started","thread_id":"t-1"}',
                             b'{"type":"error","message":"Reconnecting... 1/1 (unexpected status 401 Unauthorized)"}',
                             b'{"type":"turn.failed","error":{"message":"unexpected status 401 Unauthorized"}}'], 1, ""),
]


def same(a: Result, b: Result) -> None:
    assert a.to_summary() == b.to_summary()  # text, cost, stop reason, error, warnings, status, duration, ...
    assert (a.error is None) == (b.error is None)
    if a.error is not None and b.error is not None:
        assert (a.error.kind, a.error.domain, a.error.message, a.error.exit_code) == (
            b.error.kind, b.error.domain, b.error.message, b.error.exit_code)
    assert [m.pb for m in a.messages] == [m.pb for m in b.messages]


async def test_replay_equals_live_for_every_provider_fixture(tmp_path: Path) -> None:
    assert len(CASES) >= 10, "the CLI fixtures in tests/fixtures/cli are missing"
    path = tmp_path / "runs.jsonl"
    lives: dict[str, tuple[list[Event], Result]] = {}
    async with FileStore(path) as fs:
        for name, provider, lines, code, stderr in CASES:
            lives[name] = live(provider, lines, f"run-{name}", code, stderr)
            await fs.append(lives[name][0])
    assert {r.status for _, r in lives.values()} == {"completed", "failed"}
    assert sum(r.duration_ms or 0 for _, r in lives.values()) > 0
    async with FileStore(path) as fs:
        for name, (_, result) in lives.items():
            rebuilt = await rebuild_run(fs, f"run-{name}")
            same(rebuilt, result)
            assert rebuilt.duration_ms is not None and rebuilt.duration_ms == result.duration_ms
    for name, (events, result) in lives.items():
        [(replayed, again)] = await replay_file(path, run_id=f"run-{name}")
        assert wire(replayed) == wire(events)
        same(again, result)


async def test_rebuild_feeds_the_reducer_in_seq_order(store: EventStore) -> None:
    evs = [mk("run_started", 1), mk("assistant_delta", 2, content="persisted "), mk("assistant_delta", 3, content="result"),
           mk("result", 4, stop_reason="end_turn"), mk("run_completed", 5, status="completed")]
    await store.append([evs[0], evs[2], evs[1], evs[4], evs[3]])  # stored out of order
    res = await rebuild_run(store, "r1", "s1")
    assert res.text == "persisted result" and res.stop_reason == "end_turn" and res.status == "completed"
    assert res.duration_ms == 4 and res.events == 5
    assert await replay_session(store, "s1", 0, lambda n, _: n + 1) == 5
    start: list[str] = []
    kinds = await replay_session(store, "s1", start, lambda acc, e: [*acc, e.kind])
    assert kinds == ["run_started", "assistant_delta", "assistant_delta", "run_completed", "result"]


async def test_rebuild_of_an_unknown_or_ambiguous_run_is_a_typed_error(store: EventStore) -> None:
    with pytest.raises(AsmError) as exc:
        await rebuild_run(store, "nope")
    assert (exc.value.kind, exc.value.domain, exc.value.reason) == ("not_found", "runtime", "run_not_found")
    assert isinstance(exc.value, RunNotFound)
    assert "'nope'" in exc.value.message
    await store.append([mk("run_started", 1, session="a"), mk("run_started", 1, session="b")])
    with pytest.raises(AsmError) as exc:
        await rebuild_run(store, "r1")
    assert exc.value.reason == "run_ambiguous"
    assert (await rebuild_run(store, "r1", session_id="b")).session_id == "b"
    with pytest.raises(AsmError):
        await rebuild_run(store, "r1", session_id="c")


async def test_replay_session_wraps_store_failures() -> None:
    class Broken(MemoryStore):
        async def list_events(self, session_id: str | None = None, run_id: str | None = None) -> list[Event]:
            raise ValueError("list_invalid")

    with pytest.raises(AsmError) as exc:
        await replay_session(Broken(), "s", 0, lambda a, _: a)
    assert exc.value.kind == "runtime" and isinstance(exc.value.__cause__, ValueError)


async def test_replay_file_picks_the_last_run_and_reports_clear_errors(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"

    def run(run_id: str, session: str, text: str) -> list[Event]:
        return [mk("run_started", 1, run=run_id, session=session),
                mk("assistant_delta", 2, run=run_id, session=session, content=text),
                mk("run_completed", 3, run=run_id, session=session, status="completed")]

    await record_events(path, run("r1", "a", "one") + run("r2", "b", "two"))
    await record_events(path, run("r3", "a", "three"))
    [(events, last)] = await replay_file(path)
    assert last.run_id == "r3" and last.session_id == "a" and last.text == "three" and len(events) == 3
    assert [r.text for _, r in await replay_file(path, session_id="a")] == ["one", "three"]
    assert [r.text for _, r in await replay_file(path, run_id="r2")] == ["two"]
    assert [r.text for _, r in await replay_file(path, session_id="b", run_id="r2")] == ["two"]

    with pytest.raises(ConfigError, match="does not exist"):
        await replay_file(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match="not a file"):
        await replay_file(tmp_path)
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(AsmError) as exc:
        await replay_file(tmp_path / "empty.jsonl")
    assert exc.value.reason == "store_empty" and "holds no events" in exc.value.message
    with pytest.raises(AsmError) as exc:
        await replay_file(path, session_id="zzz")
    assert exc.value.reason == "session_not_found" and "a, b" in exc.value.message
    with pytest.raises(AsmError) as exc:
        await replay_file(path, run_id="r9")
    assert exc.value.reason == "run_not_found" and exc.value.kind == "not_found"
    with pytest.raises(AsmError) as exc:
        await replay_file(path, session_id="b", run_id="r1")
    assert exc.value.reason == "run_not_found"


def test_bad_options_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        FileStore(tmp_path / "x", fsync="sometimes")
    with pytest.raises(ConfigError):
        FileStore("")
    with pytest.raises(ConfigError):
        AsyncWriter(MemoryStore(), overflow="explode")
    with pytest.raises(ConfigError):
        AsyncWriter(MemoryStore(), queue_size=0)
