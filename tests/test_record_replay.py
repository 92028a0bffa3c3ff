"""``asm run --record`` and ``asm replay`` own the user's data: real files, real processes, a real full disk.

* ``--record PATH`` never writes into a file that is not an event store, nor into a
  device, FIFO, socket or directory: a typed error (exit 2) before the run starts,
  the file untouched.
* A run whose events could not all be recorded exits 1 with the count.
* ``asm replay`` of a damaged store says so (``metadata.damage``) and exits 1
  unless ``--allow-damaged``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from asm_controller import Event
from asm_controller.extensions.persistence import (
    AsyncWriter,
    FileStore,
    encode_line,
    replay_file,
    sniff_store,
)
from asm_wire import AsmError, ConfigError, pb
from tests.support.processes import PYTHON_BASENAME, ROOT, NodeProcess

pytestmark = pytest.mark.slow  # recordings through real CLI processes, full disks

ASM = [sys.executable, "-m", "asm_cli"]
PY = PYTHON_BASENAME


def asm(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ASM, *args], capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))


def jsonl(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def mk(kind: str, seq: int, run: str = "r1", session: str = "s1", **payload: Any) -> Event:
    msg = pb.Event(id=f"{run}:{seq}", run_id=run, session_id=session, provider="shell",
                   kind=pb.EventKind.Value("EVENT_KIND_" + kind.upper()), seq=seq,
                   timestamp_unix_nano=1_700_000_000_000_000_000 + seq * 1_000_000)
    getattr(msg, kind).CopyFrom(getattr(pb, "".join(p.title() for p in kind.split("_")))(**payload))
    return Event(msg)


def a_run(run: str = "r1", session: str = "s1", lines: int = 3) -> list[Event]:
    evs = [mk("run_started", 1, run, session)]
    evs += [mk("assistant_delta", i + 2, run, session, content=f"line {i}\n") for i in range(lines)]
    evs.append(mk("result", lines + 2, run, session, stop_reason="exit"))
    evs.append(mk("run_completed", lines + 3, run, session, status="completed"))
    return evs


def store_bytes(events: list[Event]) -> bytes:
    return b"".join(encode_line(ev.pb) for ev in events)


@pytest.fixture
def py_node(node_process: Callable[..., NodeProcess]) -> NodeProcess:
    return node_process("--shell-allow", PY)


def assert_refused(proc: subprocess.CompletedProcess[str], what: str) -> None:
    assert proc.returncode == 2, (what, proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, what
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("asm: error:")], (what, proc.stderr)
    assert not [ln for ln in proc.stdout.splitlines() if ln.strip()], (what, proc.stdout)  # nothing ran


# -- --record refuses what is not ours ------------------------------------------------------


def test_record_refuses_a_file_that_is_not_an_event_store_before_the_run(py_node: NodeProcess,
                                                                          tmp_path: Path) -> None:
    """The regression: a README became 1,884 bytes of events and the run exited 0."""
    (tmp_path / "mark.py").write_text("open('ran', 'w').write('x')\n")
    victims = {
        "README.md": b"# My project\n\nNotes I wrote by hand.\n" * 50,
        "one-line.txt": b"no newline at all, but not a store",
        "other.jsonl": b'{"a": 1}\n{"b": 2}\n',
        "binary.bin": bytes(range(256)) * 16,
    }
    for name, content in victims.items():
        path = tmp_path / name
        path.write_bytes(content)
        os.utime(path, (1_000_000_000, 1_000_000_000))
        proc = asm("run", "--node", py_node.address, "--provider", "shell", "--cwd", str(tmp_path),
                   "--record", str(path), "--output", "jsonl", f"{PY} mark.py")
        assert_refused(proc, name)
        assert "not an event store" in proc.stderr, proc.stderr
        assert path.read_bytes() == content, name
        assert path.stat().st_mtime == 1_000_000_000, name
        assert not (tmp_path / f"{name}.lock").exists(), name  # not a byte written, not even a lock file
        assert not (tmp_path / "ran").exists(), name  # refused before the run started


def test_record_refuses_devices_fifos_sockets_and_directories(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    link_to_fifo = tmp_path / "link"
    link_to_fifo.symlink_to(fifo)
    try:
        cases = {"/dev/zero": "device", "/dev/null": "device", str(fifo): "FIFO", str(link_to_fifo): "FIFO",
                 str(sock_path): "socket", str(tmp_path): "directory"}
        for target, kind in cases.items():
            start = time.monotonic()
            proc = asm("run", "--provider", "shell", "--record", target, "echo hi", timeout=30)
            assert_refused(proc, target)  # /dev/zero exhausted memory, the FIFO hung: both answer at once
            assert kind in proc.stderr and time.monotonic() - start < 20, (target, proc.stderr)
    finally:
        sock.close()


def test_record_appends_to_a_store_and_follows_a_symlink_to_it(tmp_path: Path) -> None:
    store = tmp_path / "events.jsonl"
    first = asm("run", "--provider", "shell", "--record", str(store), "echo one")
    assert first.returncode == 0, first.stderr
    size = store.stat().st_size
    link = tmp_path / "link.jsonl"
    link.symlink_to(store.name)
    second = asm("run", "--provider", "shell", "--record", str(link), "echo two")
    assert second.returncode == 0, second.stderr
    assert link.is_symlink() and store.stat().st_size > size  # appended to the target, the link kept

    async def texts() -> list[str]:
        out = []
        async with FileStore(store, readonly=True) as fs:
            for sid in await fs.sessions():
                out += [r.text for _, r in await replay_file(store, session_id=sid)]
        return out

    assert asyncio.run(texts()) == ["one\n", "two\n"]


def test_sniff_recognises_our_format_only(tmp_path: Path) -> None:
    good = store_bytes(a_run())
    rest = good.split(b"\n", 1)[1]
    samples = {
        b"": None,  # empty: ours (nothing to lose)
        good: None,
        good[:30]: None,  # the first write torn by a crash
        b"garbage\n" + rest: None,  # a damaged first line, good records after it: still a store
        b"hello\n": "not",
        b'{"v": "x"}\n': "not",
        b"x" * (2 << 20): "not",
    }
    for i, (content, expect) in enumerate(samples.items()):
        p = tmp_path / f"s{i}"
        p.write_bytes(content)
        fd = os.open(p, os.O_RDONLY)
        try:
            why = sniff_store(fd)
        finally:
            os.close(fd)
        assert (why is None) == (expect is None), (content[:40], why)


# -- a record that lost events is a failure ---------------------------------------------------


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (root only; skipped where mounting is not permitted)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_record_to_a_full_disk_exits_1_with_the_number_of_unrecorded_events(py_node: NodeProcess, tmp_path: Path,
                                                                            tiny_fs: Path) -> None:
    """The regression: 2,442 of 5,003 events lost, exit 0."""
    (tmp_path / "gen.py").write_text("for i in range(5000):\n    print('line', i)\n")
    store = tiny_fs / "events.jsonl"
    proc = asm("run", "--node", py_node.address, "--provider", "shell", "--cwd", str(tmp_path),
               "--record", str(store), "--output", "jsonl", f"{PY} gen.py", timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = jsonl(proc.stdout)
    summary = lines[-1]
    assert summary["kind"] == "result_summary" and summary["status"] == "completed", summary["status"]
    total = len(lines) - 1
    assert total == 5003
    rec = summary["metadata"]["recording"]
    lost = rec["unrecorded_events"]

    async def stored() -> int:
        async with FileStore(store, readonly=True) as fs:
            return len(await fs.list_events())

    kept = asyncio.run(stored())
    assert lost > 0 and kept + lost == total and rec["recorded_events"] == kept, (kept, lost)
    assert f"{lost} event(s) not recorded to {store}" in proc.stderr, proc.stderr
    assert rec["error"]["reason"] == "store_write_failed" and "Traceback" not in proc.stderr
    # What was recorded is a valid (if incomplete) store, and replay says it is incomplete.
    replay = asm("replay", str(store), "--output", "jsonl")
    assert replay.returncode == 1 and jsonl(replay.stdout)[-1]["metadata"]["damage"], replay.stderr


async def test_writer_counts_every_event_a_full_device_refused(tmp_path: Path) -> None:
    """The writer's ENOSPC path with /dev/full (a device --record refuses, so it is put under the store's fd)."""
    store = FileStore(tmp_path / "e.jsonl", fsync="never")
    await store.open()
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        os.dup2(full, store._fd)
    finally:
        os.close(full)
    writer = AsyncWriter(store, retries=1, retry_backoff=0.0, overflow="block", close_store=True)
    for ev in a_run(lines=20):
        await writer.put(ev)
    with pytest.raises(AsmError, match="23 event") as info:
        await writer.flush()
    assert info.value.reason == "persistence_write_failed"
    await writer.close()
    assert writer.failed == 23 and writer.written == 0 and writer.errors
    assert "No space left" in writer.errors[0].message  # the cause, even after the undo failed on a device


# -- replay reports damage ----------------------------------------------------------------------


def _damaged(tmp_path: Path) -> dict[str, tuple[Path, set[str]]]:
    good = store_bytes(a_run())
    lines = good.splitlines(keepends=True)
    cases = {
        "intact": (good, set()),
        "torn_last_line": (good[:-25], {"torn_tail", "missing_run_completed"}),
        "garbage_in_the_middle": (b"".join([*lines[:2], b"\x00garbage\xff\n", *lines[2:]]), {"bad_lines"}),
        "missing_run_completed": (b"".join(lines[:-1]), {"missing_run_completed"}),
        "seq_gap": (b"".join([*lines[:2], *lines[3:]]), {"seq_gap"}),
    }
    out = {}
    for name, (content, kinds) in cases.items():
        p = tmp_path / f"{name}.jsonl"
        p.write_bytes(content)
        out[name] = (p, kinds)
    return out


async def test_replay_file_describes_the_damage(tmp_path: Path) -> None:
    for name, (path, kinds) in _damaged(tmp_path).items():
        before = path.read_bytes()
        [(_, result)] = await replay_file(path)
        damage = result.metadata.get("damage", [])
        assert {d["kind"] for d in damage} == kinds, (name, damage)
        assert path.read_bytes() == before  # replay changes nothing
    [(_, gap)] = await replay_file(tmp_path / "seq_gap.jsonl")
    assert gap.metadata["damage"] == [{"kind": "seq_gap", "from": 3, "to": 3, "missing": 1}]


def test_asm_replay_exits_1_on_damage_unless_allowed(tmp_path: Path) -> None:
    cases = _damaged(tmp_path)
    intact = asm("replay", str(cases["intact"][0]), "--output", "jsonl")
    assert intact.returncode == 0 and "damage" not in jsonl(intact.stdout)[-1]["metadata"], intact.stderr
    for name in ("torn_last_line", "garbage_in_the_middle", "seq_gap"):
        path, kinds = cases[name]
        proc = asm("replay", str(path), "--output", "jsonl")
        assert proc.returncode == 1, (name, proc.stderr)
        assert {d["kind"] for d in jsonl(proc.stdout)[-1]["metadata"]["damage"]} == kinds
        assert "--allow-damaged" in proc.stderr and "Traceback" not in proc.stderr
        allowed = asm("replay", str(path), "--allow-damaged")
        assert allowed.returncode == 0 and "asm: warning:" in allowed.stderr, (name, allowed.stderr)
    text = asm("replay", str(cases["missing_run_completed"][0]))
    assert text.returncode == 1 and "no run_completed" in text.stderr


async def test_filestore_never_cuts_a_file_with_no_record_of_ours(tmp_path: Path) -> None:
    """Opening for writing used to treat a whole foreign file as a "damaged tail" and truncate it to 0."""
    path = tmp_path / "notes.txt"
    path.write_bytes(b"line one\nline two\n")
    with pytest.raises(ConfigError, match="not an event store"):
        await FileStore(path).open()
    assert path.read_bytes() == b"line one\nline two\n"
