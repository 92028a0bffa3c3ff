"""One CLI run on the node: its process, its event buffer, its subscribers.

The run owns the CLI's lifecycle; gRPC streams only *follow* it. A subscriber
that disconnects does not stop the CLI: the run keeps going and buffering
until ``detach_grace_s`` passes with nobody attached, and then it is
interrupted. Every run ends with exactly one ``run_completed`` event, so a
follower can tell the end of a run from the end of a connection.

The run's events live in an :class:`~asm_node.eventlog.EventLog` (frames, followers'
cursors, back-pressure on the stdout pump, the replay bounds and :class:`ReplayBudget`); this
module stamps each event and supervises the CLI around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from asm_node._encode import delta_events
from asm_node.config import MAX_APPROVAL_TIMEOUT_MS, MAX_DEADLINE_MS
from asm_node.eventlog import FRAME_OVERHEAD, MAX_BATCH_BYTES, MAX_BATCH_EVENTS, EventLog, ReplayBudget
from asm_node.process import (
    LineReader,
    Reaper,
    group_alive,
    leader_exited,
    pump,
    signal_group,
    spawn_run,
    terminate_group,
)
from asm_node.providers.base import (
    RUN_OPTIONS,
    CommandSpec,
    ExitInfo,
    LineParser,
    RunSpec,
    error_event,
    remove_run_files,
)
from asm_wire import (
    KIND_NAMES,
    ApprovalNotFound,
    AsmError,
    ConfigError,
    Decision,
    EventKind,
    ReplayGap,
    RunStatus,
    choices,
    is_failure,
    kind_value,
    make_error,
    pb,
    run_status_value,
)
from asm_wire._options import parse_options_json

if TYPE_CHECKING:
    from asm_node.config import NodeConfig
    from asm_node.metrics import NodeMetrics

log = logging.getLogger("asm_node.run")

# The event log's names stay importable from here (they lived in this module).
__all__ = ["FRAME_OVERHEAD", "LINES_PER_EMIT", "MAX_BATCH_BYTES", "MAX_BATCH_EVENTS", "MAX_INPUT_BACKLOG_BYTES",
           "MAX_INPUT_BYTES", "Deadlines", "ReplayBudget", "Run", "options_from_json", "run_deadlines"]

#: Lines parsed into events per step: one 256 KiB read of tiny lines is ~128k lines, and their
#: Event objects all alive at once cost ~100 MB of transient RSS; slices keep that small.
LINES_PER_EMIT = 4096

_APPROVAL_REQUESTED = kind_value(EventKind.APPROVAL_REQUESTED)
_ERROR = kind_value(EventKind.ERROR)
_DELTA = kind_value(EventKind.ASSISTANT_DELTA)

#: Why a deadline ended a run: the ``reason`` of its ``timeout`` error (asm_wire._errors' table).
RUN_TIMEOUT, IDLE_TIMEOUT, COMMAND_TIMEOUT = "run_timeout", "idle_timeout", "command_timeout"
#: The reason of the ``approval_denied`` warning of an approval nobody answered in time.
APPROVAL_TIMEOUT = "approval_timeout"
#: The most one SendInput may carry (``input_too_large`` past it): steering text, not a file transfer.
MAX_INPUT_BYTES = 1 << 20
#: The most input written to a CLI's stdin and not yet read by it (``input_backlog`` past it).
MAX_INPUT_BACKLOG_BYTES = 8 << 20


@dataclass(frozen=True)
class Deadlines:
    """A run's deadlines, in milliseconds (None: off): the node's supervision enforces them, not the CLI."""

    run_ms: int | None = None
    idle_ms: int | None = None
    approval_ms: int = 120_000


def _deadline_ms(name: str, value: Any) -> int:
    """A run option in milliseconds: a positive integer (a string of digits too), at most MAX_DEADLINE_MS."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"option {name} must be a positive integer number of milliseconds, not {str(value)[:40]!r}",
                          reason="invalid_deadline")
    if value > MAX_DEADLINE_MS:
        raise ConfigError(f"option {name} is {value} ms: at most {MAX_DEADLINE_MS} ms (7 days)",
                          reason="invalid_deadline")
    return value


def run_deadlines(options: Mapping[str, Any], approval_timeout_ms: int, config: NodeConfig) -> tuple[Deadlines, dict[str, Any]]:
    """The run's deadlines (its options, else the node's defaults) and its options without them.

    ``run_timeout_ms`` / ``idle_timeout_ms`` (RUN_OPTIONS) are the node's, so they leave the options before
    a provider validates them: every provider accepts them without knowing. ``approval_timeout_ms`` is the
    StartRun field (0: the node's default), at most 24 h.
    """
    if approval_timeout_ms > MAX_APPROVAL_TIMEOUT_MS:
        raise ConfigError(f"approval_timeout_ms is {approval_timeout_ms} ms: at most {MAX_APPROVAL_TIMEOUT_MS} ms (24 h)",
                          reason="invalid_deadline")
    run_ms = config.run_timeout_ms
    idle_ms = config.idle_timeout_ms
    if "run_timeout_ms" in options:
        run_ms = _deadline_ms("run_timeout_ms", options["run_timeout_ms"])
    if "idle_timeout_ms" in options:
        idle_ms = _deadline_ms("idle_timeout_ms", options["idle_timeout_ms"])
    rest = {k: v for k, v in options.items() if k not in RUN_OPTIONS}
    return Deadlines(run_ms, idle_ms, approval_timeout_ms or config.approval_timeout_ms), rest


def _ms_text(ms: int) -> str:
    """``2000 ms (2s)``: the option's unit, and a reading a person takes in at once."""
    seconds = ms / 1000
    human = f"{seconds:g}s" if seconds < 120 else f"{seconds / 60:g} min" if seconds < 7200 else f"{seconds / 3600:g} h"
    return f"{ms} ms ({human})"


class Run:
    def __init__(
        self,
        spec: RunSpec,
        command: CommandSpec,
        parser: LineParser,
        config: NodeConfig,
        reaper: Reaper | None,
        on_finished: Callable[[Run], None],
        metrics: NodeMetrics | None = None,
        budget: ReplayBudget | None = None,
        deadlines: Deadlines | None = None,
    ) -> None:
        self.metrics = metrics
        self.deadlines = deadlines if deadlines is not None else Deadlines(
            config.run_timeout_ms, config.idle_timeout_ms, config.approval_timeout_ms)
        #: The run's events (frames, followers, back-pressure, replay bounds).
        self.log = EventLog(spec.run_id, max_events=config.replay_buffer_events,
                            max_bytes=config.replay_max_bytes_per_run,
                            backlog_max_bytes=config.backlog_max_bytes, budget=budget)
        #: Events emitted, by kind value (summed into the node's metrics at scrape time).
        self.kind_counts = [0] * len(KIND_NAMES)
        self.counted = False
        self.last_event_mono = time.monotonic()
        self._first_output = False
        self.spec = spec
        #: The principal that started the run (asm_wire._principal); set by the agent.
        self.owner = ""
        self.command = command
        self.parser = parser
        self.config = config
        self.reaper = reaper
        self._on_finished = on_finished
        self.status: str = RunStatus.STARTING
        self.pid = 0
        self.exit_code = -1
        self.started_ns = time.time_ns()
        self.finished_ns = 0
        self.finished_mono = 0.0
        self.done = False
        self.subscribers = 0
        self._interrupt = asyncio.Event()
        # Why the run was interrupted: the kind and message of its final error event.
        self._interrupt_kind = "user_cancelled"
        self._interrupt_message = "Run interrupted"
        self._interrupt_reason = ""  # a deadline's reason (run_timeout, idle_timeout, command_timeout)
        self._detach_timer: asyncio.TimerHandle | None = None
        self._approvals: dict[str, asyncio.TimerHandle] = {}
        self._approval_subjects: dict[str, str] = {}
        #: When the CLI last wrote anything (stdout or stderr), or an approval was asked or answered: the
        #: idle deadline counts from here.
        self.active_mono = time.monotonic()
        self._proc: asyncio.subprocess.Process | None = None
        self._stderr_tail = bytearray()
        self._stderr_sent = 0
        self._stderr_capped = False
        self.task: asyncio.Task[None] | None = None
        #: The CLI's leader has exited: the run is ending on its own (an InterruptRun is not accepted).
        self._exited = False
        #: What broke the node's supervision of the run (the run's final runtime error), if anything did.
        self._supervision_error = ""
        #: One SendInput at a time writes to the CLI's stdin (its buffer is checked against the cap first).
        self._input_lock = asyncio.Lock()
        #: The run's first failing error event (code, domain, message, reason), kept for the node's run journal.
        self.first_error: tuple[str, str, str, str] | None = None

    # -- events ----------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        return self.log.last_seq

    @property
    def first_held_seq(self) -> int:
        return self.log.first_held_seq

    @property
    def held_bytes(self) -> int:
        """Bytes of serialized event frames held for replay."""
        return self.log.held_bytes

    @property
    def held_cost(self) -> int:
        """What the held frames cost in memory: their bytes plus FRAME_OVERHEAD each."""
        return self.log.held_cost

    @property
    def backlog_bytes(self) -> int:
        """Cost of the frames the slowest attached follower has yet to send (0 with nobody attached)."""
        return self.log.backlog_bytes

    @property
    def pauses(self) -> int:
        """How many times the stdout pump paused for a slow follower (tests, metrics)."""
        return self.log.pauses

    def _emit(self, events: list[pb.Event]) -> None:
        """Stamp ``events`` (seq, ids, timestamp), note what supervision needs, append them to the log."""
        if not events:
            return
        rid, sid, prov = self.spec.run_id, self.spec.session_id, self.spec.provider
        psid = self.parser.provider_session_id
        ts = time.time_ns()
        seq = self.log.last_seq
        counts = self.kind_counts
        datas: list[bytes] = []
        self.last_event_mono = time.monotonic()
        for ev in events:
            counts[ev.kind] += 1
            seq += 1
            ev.id = f"{rid}:{seq}"
            ev.run_id = rid
            ev.session_id = sid
            ev.provider = prov
            ev.seq = seq
            ev.timestamp_unix_nano = ts
            if psid:
                ev.provider_session_id = psid
            if ev.kind == _APPROVAL_REQUESTED:
                self._arm_approval(ev.approval_requested.approval_id, ev.approval_requested.subject)
            elif ev.kind == _ERROR and self.first_error is None and is_failure(ev.error.severity):
                self.first_error = (ev.error.code, ev.error.domain, ev.error.message, ev.metadata.get("reason", ""))
            datas.append(ev.SerializeToString())
        self.log.append(datas)

    def _emit_deltas(self, texts: list[str]) -> None:
        """:meth:`_emit` for plain output lines (``assistant_delta`` events of these texts), their bytes
        made directly (asm_node._encode: the same bytes, without a message a line)."""
        if not texts:
            return
        spec = self.spec
        self.kind_counts[_DELTA] += len(texts)
        self.last_event_mono = time.monotonic()
        self.log.append(delta_events(spec.run_id, spec.session_id, spec.provider, self.parser.provider_session_id,
                                     self.log.last_seq + 1, time.time_ns(), texts))

    async def follow(self, after_seq: int) -> AsyncIterator[bytes]:
        """Serialized EventBatch frames with every event after ``after_seq``, live until the run ends.

        While someone follows, the run is attached (no detach timer); the last one to leave arms it.
        """
        self.subscribers += 1
        if self._detach_timer is not None:
            self._detach_timer.cancel()
            self._detach_timer = None
        try:
            # aclosing: the log's cursor must go the moment this follower does (it bounds back-pressure).
            async with contextlib.aclosing(self.log.follow(after_seq)) as batches:
                async for data in batches:
                    yield data
        except ReplayGap:
            if self.metrics is not None:
                self.metrics.overflows.labels("replay").inc()
            raise
        finally:
            self.subscribers -= 1
            if self.subscribers == 0 and not self.done:
                self._arm_detach()

    def _arm_detach(self) -> None:
        grace = self.config.detach_grace_s
        loop = asyncio.get_running_loop()
        self._detach_timer = loop.call_later(grace, self._detached)

    def _detached(self) -> None:
        self._detach_timer = None
        if self.subscribers == 0 and not self.done:
            log.warning("run %s had no subscriber for %.0fs; interrupting it", self.spec.run_id, self.config.detach_grace_s)
            self.interrupt()

    # -- control ---------------------------------------------------------------

    def interrupt(self, kind: str = "user_cancelled", message: str = "Run interrupted") -> bool:
        """Stop the CLI; the run ends ``interrupted`` with a final error of ``kind``.

        ``kind`` tells a client why: ``user_cancelled`` (a client asked), ``node_draining``
        (the drain deadline passed) or ``node_shutdown`` (the agent is stopping). The
        first interrupt's reason wins.
        """
        return self._stop(kind, message, "", "interrupted")

    def _stop(self, kind: str, message: str, reason: str, approval_reason: str) -> bool:
        """Interrupt the run; False when it is over or ending on its own (its CLI has exited, or its last turn
        ended): then nothing is stopped and the run's own end stands (an interrupt would be a lie)."""
        if self.done or self._interrupt.is_set():
            return not self.done
        if self._exited or self.parser.terminal:
            self.log.stop_pacing()  # as an interrupt would: what is left is read without waiting for followers
            return False
        self._interrupt_kind, self._interrupt_message, self._interrupt_reason = kind, message, reason
        self._interrupt.set()
        self.log.stop_pacing()
        # Nobody will answer a pending approval of a stopped run: resolve it now.
        for approval_id in list(self._approvals):
            self._resolve_approval_now(approval_id, Decision.DENY, approval_reason)
        return True

    def _expire(self, reason: str, limit_ms: int) -> None:
        """A deadline passed: stop the CLI as an interrupt does (SIGINT, SIGTERM, SIGKILL of its group); the
        run fails with ``timeout`` and the deadline's ``reason``, its message naming the option that fired."""
        limit = _ms_text(limit_ms)
        message = {
            RUN_TIMEOUT: f"run_timeout_ms of {limit} passed (wall clock since the CLI started): the run was stopped",
            IDLE_TIMEOUT: f"idle_timeout_ms of {limit} passed without any output from the CLI: the run was stopped",
            COMMAND_TIMEOUT: f"the shell command was still running when its command_timeout_ms of {limit} passed: "
                             "it was stopped (the option command_timeout_ms raises the limit)",
        }[reason]
        log.info("run %s: %s", self.spec.run_id, message)
        self._stop("timeout", message, reason, reason)

    async def _watch_deadlines(self, started: float) -> None:
        """Fire the first deadline that passes: the shell's command timeout, run_timeout_ms, idle_timeout_ms.

        Waiting for a person (an approval pending) or for a slow follower (the stdout pump paused by
        back-pressure: the CLI is blocked writing) is not idleness.
        """
        d = self.deadlines
        command_ms = int(self.command.timeout_s * 1000) if self.command.timeout_s else None
        while not self._interrupt.is_set():
            now = time.monotonic()
            if self._approvals or self.log.paused:
                self.active_mono = now
            waits = []
            for reason, limit, since in ((COMMAND_TIMEOUT, command_ms, started), (RUN_TIMEOUT, d.run_ms, started),
                                         (IDLE_TIMEOUT, d.idle_ms, self.active_mono)):
                if limit is None:
                    continue
                left = since + limit / 1000 - now
                if left <= 0:
                    self._expire(reason, limit)
                    return
                waits.append(left)
            if not waits:
                return
            # The idle deadline only moves later (output, an answer, the pump resuming touch it), so sleeping
            # until it and looking again is exact, with no wake-up per run in between. While a person or a
            # follower is waited for, it is pushed on at least twice a second.
            waiting = bool(self._approvals) or self.log.paused
            await asyncio.sleep(min(*waits, 0.5) if d.idle_ms is not None and waiting else min(waits))

    def _touch(self) -> None:
        self.active_mono = time.monotonic()

    def _arm_approval(self, approval_id: str, subject: str) -> None:
        """Deny the approval when nobody answers within the run's approval timeout."""
        loop = asyncio.get_running_loop()
        self.active_mono = time.monotonic()
        self._approval_subjects[approval_id] = subject
        earlier = self._approvals.get(approval_id)
        if earlier is not None:
            # The CLI asked again for an approval still pending (the same id): one request, answered once,
            # and its timeout counts from the latest ask (the earlier timer would deny it early).
            earlier.cancel()
        self._approvals[approval_id] = loop.call_later(
            self.deadlines.approval_ms / 1000, self._approval_expired, approval_id)

    def _approval_expired(self, approval_id: str) -> None:
        """Nobody answered: deny (reason ``timeout``) and say so in a warning, so that the Result shows
        that the run went on without what it asked for."""
        if approval_id not in self._approvals:
            return
        subject = self._approval_subjects.get(approval_id, "")
        self._resolve_approval_now(approval_id, Decision.DENY, "timeout")
        warning = error_event(
            f"approval {approval_id}{f' ({subject})' if subject else ''} was not answered within "
            f"{_ms_text(self.deadlines.approval_ms)} and was denied", "approval_denied", "approval",
            severity=pb.SEVERITY_WARNING)
        warning.metadata["reason"] = APPROVAL_TIMEOUT
        self._emit([warning])

    def resolve_approval(self, approval_id: str, decision: str, reason: str) -> None:
        if decision not in choices(Decision):
            raise ConfigError(f"invalid approval decision {decision!r}: expected {' or '.join(choices(Decision))}")
        if approval_id not in self._approvals:
            raise ApprovalNotFound(f"Unknown approval id: {approval_id}")
        self._resolve_approval_now(approval_id, decision, reason)

    def _resolve_approval_now(self, approval_id: str, decision: str, reason: str) -> None:
        timer = self._approvals.pop(approval_id, None)
        if timer is None:
            return
        timer.cancel()
        self._approval_subjects.pop(approval_id, None)
        self.active_mono = time.monotonic()  # the CLI gets a whole idle period to act on the answer
        # Deliver the decision to the CLI when it can take one (Claude Code's stdio permission prompt).
        payload = self.parser.approval_response(approval_id, decision, reason)
        proc = self._proc
        if payload and proc is not None and proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.write(payload)
        self._emit([
            pb.Event(
                kind=kind_value(EventKind.APPROVAL_RESOLVED),
                approval_resolved=pb.ApprovalResolved(approval_id=approval_id, decision=decision, reason=reason),
            )
        ])

    async def send_input(self, data: bytes, end: bool) -> None:
        """Deliver a client's input to the CLI (steering a Claude run: a user message mid-run).

        The parser frames it (input_message); once the run's last turn ended, stdin is closed and
        the input is refused as run_not_running rather than written to a CLI that will not read it.
        One input is at most MAX_INPUT_BYTES (``input_too_large``); calls write one at a time, and one
        that would take what the CLI has yet to read past MAX_INPUT_BACKLOG_BYTES is refused
        (``input_backlog``, RESOURCE_EXHAUSTED): a call cancelled in its drain leaves its bytes queued,
        so without the cap a CLI that does not read would grow the node's buffer without limit."""
        if not self.command.stdin or self.command.close_stdin_after_data:
            raise ConfigError(f"run {self.spec.run_id} does not accept input: provider {self.spec.provider} takes "
                              "no input while it runs (steering is for Claude runs, through stream-json input, "
                              "unless started with steering=false)",
                              reason="input_not_supported")
        if len(data) > MAX_INPUT_BYTES:
            raise ConfigError(f"input of {len(data)} bytes for run {self.spec.run_id} is over the node's limit of "
                              f"{MAX_INPUT_BYTES} bytes per SendInput", reason="input_too_large")
        async with self._input_lock:
            proc = self._proc
            if proc is None or proc.stdin is None or self.done or proc.stdin.is_closing() or self.parser.terminal:
                raise make_error("config_invalid", "runtime", f"run {self.spec.run_id} is not running",
                                 reason="run_not_running")
            payload = self.parser.input_message(data) if data else b""
            queued = proc.stdin.transport.get_write_buffer_size()
            if payload and queued + len(payload) > MAX_INPUT_BACKLOG_BYTES:
                raise make_error("at_capacity", "runtime",
                                 f"run {self.spec.run_id}'s CLI has not read {queued} bytes of earlier input: this "
                                 f"input of {len(payload)} bytes would take the queue past {MAX_INPUT_BACKLOG_BYTES} "
                                 "bytes; retry once the CLI reads its input", reason="input_backlog")
            try:
                if payload:
                    proc.stdin.write(payload)
                await proc.stdin.drain()
            except (BrokenPipeError, ConnectionResetError):  # the CLI closed its stdin: it takes no more input
                raise make_error("config_invalid", "runtime", f"run {self.spec.run_id} no longer reads input",
                                 reason="run_not_running") from None
            if end:
                proc.stdin.close()

    def info(self) -> pb.RunInfo:
        return pb.RunInfo(
            run_id=self.spec.run_id,
            session_id=self.spec.session_id,
            provider=self.spec.provider,
            status=run_status_value(self.status),
            last_seq=self.last_seq,
            first_held_seq=self.log.first_held_seq,
            pid=self.pid,
            exit_code=self.exit_code,
            subscribers=self.subscribers,
            started_unix_nano=self.started_ns,
            finished_unix_nano=self.finished_ns,
            cwd=self.spec.cwd,
            owner=self.owner,
        )

    # -- lifecycle -------------------------------------------------------------

    def _on_lines(self, lines: list[bytes]) -> None:
        if len(lines) > LINES_PER_EMIT:
            for i in range(0, len(lines), LINES_PER_EMIT):
                self._on_lines(lines[i:i + LINES_PER_EMIT])
            return
        if self.parser.terminal:
            return
        texts = self.parser.delta_texts(lines)
        if texts is not None:
            self._emit_deltas(texts)  # nothing else to look at: plain output, encoded directly
            self._note_first_output()
            return
        out: list[pb.Event] = []
        self.parser.feed_lines(lines, out)
        if out:
            self._note_first_output()
        if self.parser.terminal and self.command.close_stdin_at_end:
            proc = self._proc
            if proc is not None and proc.stdin is not None and not proc.stdin.is_closing():
                proc.stdin.close()  # the turn is over: let a stream-json CLI exit
        if self._interrupt.is_set():
            # What a CLI reports while it is being interrupted (Claude: an error_during_execution
            # result) is a consequence of the interrupt: kept, but the run ends with the interrupt's kind.
            for ev in out:
                if ev.kind == _ERROR:
                    ev.error.severity = pb.SEVERITY_WARNING
        self._emit(out)

    def _note_first_output(self) -> None:
        if not self._first_output:
            self._first_output = True
            if self.metrics is not None:
                self.metrics.first_event.labels(self.spec.provider).observe((time.time_ns() - self.started_ns) / 1e9)

    def _on_overflow(self, size: int) -> None:
        if self.metrics is not None:
            self.metrics.overflows.labels("stdout").inc()
        self._emit([
            error_event(
                f"stdout line of {size} bytes exceeds the node's line cap of {self.config.line_cap_bytes} bytes; line dropped",
                "buffer_overflow", "transport", severity=pb.SEVERITY_WARNING,
            )
        ])

    async def _drain_stderr(self, stream: asyncio.StreamReader) -> None:
        cap, tail_cap = self.config.stderr_cap_bytes, self.config.stderr_tail_bytes
        line_cap = 64 * 1024

        def on_lines(lines: list[bytes]) -> None:
            out = []
            for raw in lines:
                if self._stderr_sent >= cap:
                    if not self._stderr_capped:
                        self._stderr_capped = True
                        if self.metrics is not None:
                            self.metrics.overflows.labels("stderr").inc()
                        out.append(error_event(
                            f"stderr exceeded {cap} bytes; further stderr is dropped (its tail is kept for diagnostics)",
                            "buffer_overflow", "transport", severity=pb.SEVERITY_WARNING,
                        ))
                    break
                text = raw[:line_cap].rstrip(b"\r").decode("utf-8", "replace")
                self._stderr_sent += len(raw) + 1
                out.append(pb.Event(kind=kind_value(EventKind.STDERR), stderr=pb.Stderr(content=text)))
            self._emit(out)

        # Lines are framed with the same cap as stdout; overlong stderr lines are cut, not fatal.
        reader = LineReader(line_cap, on_lines, lambda _n: None)
        while True:
            chunk = await stream.read(64 * 1024)
            if not chunk:
                reader.close()
                return
            self.active_mono = time.monotonic()
            self._stderr_tail += chunk
            if len(self._stderr_tail) > tail_cap:
                del self._stderr_tail[: len(self._stderr_tail) - tail_cap]
            reader.feed(chunk)

    def _fail_before_spawn(self, err: AsmError) -> None:
        self._emit([error_event(err.message, err.kind, err.domain)])
        self._complete(RunStatus.FAILED, -1, 0)

    def _complete(self, status: str, exit_code: int, sig: int) -> None:
        self.status = status
        self.exit_code = exit_code
        self.finished_ns = time.time_ns()
        duration_ms = (self.finished_ns - self.started_ns) // 1_000_000
        self._emit([
            pb.Event(
                kind=kind_value(EventKind.RUN_COMPLETED),
                run_completed=pb.RunCompleted(status=status, exit_code=exit_code, signal=sig, duration_ms=duration_ms),
            )
        ])
        for timer in self._approvals.values():
            timer.cancel()
        self._approvals.clear()
        self._approval_subjects.clear()
        self.done = True
        self.finished_mono = time.monotonic()
        # A retained run keeps only its frames: the stderr tail (up to 64 KiB) and the
        # process handle served the run that just ended, and the node may hold many runs.
        self._stderr_tail = bytearray()
        self._proc = None
        self.log.close()  # its frames leave the node's replay budget for the finished runs' retention
        self._on_finished(self)

    async def main(self) -> None:
        """Run the CLI; whatever happens (the agent cancelling the task, a bug), the run ends here: its
        followers get ``run_completed``, its log closes and it leaves the agent's active runs."""
        try:
            await self._main()
        except asyncio.CancelledError:
            self._end_unfinished("interrupted")
            raise
        except Exception as exc:  # a bug in supervision, not the CLI's failure: logged, and the run still ends
            log.exception("run %s: supervision failed", self.spec.run_id)
            self._supervision_error = self._supervision_error or f"{type(exc).__name__}: {exc}"
            self._end_unfinished("error")
        finally:
            self._end_unfinished("error")  # a path that left without finishing (none is known): still ended
            remove_run_files(self.command.run_files)  # an MCP config with credentials, a schema: the run's only

    def _end_unfinished(self, end: str) -> None:
        """Finish a run nothing else finished; if even that fails, close its log and let the agent forget it."""
        if self.done:
            return
        proc = self._proc
        if proc is not None and proc.returncode is None:
            signal_group(proc.pid, signal.SIGKILL)  # no CLI outlives its run (reaped by the child watcher)
        try:
            self._finish(end, proc.returncode if proc is not None else None)
        except Exception:
            log.exception("run %s: could not end the run cleanly", self.spec.run_id)
            if not self.done:
                self.status = RunStatus.FAILED
                self.done = True
                self.finished_ns = time.time_ns()
                self.finished_mono = time.monotonic()
                self._proc = None
                self.log.close()  # its followers end (their stream closes) rather than wait forever
                self._on_finished(self)

    async def _leader_exit(self, proc: asyncio.subprocess.Process) -> int:
        """:func:`leader_exited`, noting the exit: from then on the run ends on its own (InterruptRun: not accepted)."""
        rc = await leader_exited(proc)
        self._exited = True
        return rc

    def _interrupted(self) -> bool:
        """An accepted interrupt decides the end, unless the CLI's last turn already ended (its result counts)."""
        return self._interrupt.is_set() and not self.parser.terminal

    async def _main(self) -> None:
        cmd = self.command
        if self._interrupt.is_set():
            # Interrupted while starting (an InterruptRun, a deadline, the agent stopping): the CLI never runs.
            return self._finish("interrupted", None)
        try:
            # The run's cgroup is made in the spawn thread too (a cgroup mkdir is ~0.2 ms of kernel work).
            proc, cgroup = await spawn_run(cmd.argv, cmd.cwd, cmd.env, cmd.stdin,
                                           self.reaper.new_cgroup if self.reaper is not None else None)
        except FileNotFoundError:
            return self._fail_before_spawn(
                make_error("cli_not_found", "provider", f"{cmd.argv[0]} not found on the node", reason="provider_missing")
            )
        except PermissionError as exc:
            return self._fail_before_spawn(make_error("cli_not_found", "provider", f"cannot execute {cmd.argv[0]}: {exc}"))
        except OSError as exc:
            return self._fail_before_spawn(make_error("transport_error", "transport", f"spawn failed: {exc}"))
        except ValueError as exc:  # e.g. "embedded null byte": the run must still end with run_completed
            return self._fail_before_spawn(make_error("config_invalid", "config", f"cannot start {cmd.argv[0]}: {exc}"))
        self._proc = proc
        self.pid = proc.pid
        cfg = self.config
        escalation = [(signal.SIGINT, cfg.interrupt_grace_s), (signal.SIGTERM, cfg.term_grace_s)]
        killed = self._interrupt.is_set()
        if killed:
            # The interrupt came while the spawn was under way: the CLI is killed before it can act on the
            # prompt, not asked to stop (a CLI may finish its turn on SIGINT); the usual end follows.
            signal_group(proc.pid, signal.SIGKILL)
            escalation = [(signal.SIGKILL, cfg.term_grace_s)]
        tasks: list[asyncio.Task[Any]] = []
        end = "exit"
        tracked = False
        try:
            if cmd.stdin_data and proc.stdin is not None and not killed:
                proc.stdin.write(cmd.stdin_data)
                if cmd.close_stdin_after_data:
                    proc.stdin.close()  # flushed first; the CLI reads its prompt to EOF
            if self.reaper is not None:
                tracked = True
                self.reaper.track(proc.pid, cgroup)
            self.status = RunStatus.RUNNING
            self._emit([
                pb.Event(
                    kind=kind_value(EventKind.RUN_STARTED),
                    run_started=pb.RunStarted(command=cmd.argv[0], args=cmd.argv[1:], cwd=cmd.cwd, pid=proc.pid),
                )
            ])
            assert proc.stdout is not None and proc.stderr is not None
            stdout_task = asyncio.create_task(
                pump(proc.stdout, LineReader(self.config.line_cap_bytes, self._on_lines, self._on_overflow),
                     lambda: self.parser.terminal, self.log.gate, on_chunk=self._touch)
            )
            stderr_task = asyncio.create_task(self._drain_stderr(proc.stderr))
            wait_task = asyncio.create_task(self._leader_exit(proc))
            intr_task = asyncio.create_task(self._interrupt.wait())
            tasks += [stdout_task, stderr_task, wait_task, intr_task]
            self.active_mono = started = time.monotonic()
            # A deadline stops the run the way an interrupt does (it sets _interrupt).
            tasks.append(asyncio.create_task(self._watch_deadlines(started)))
            done, _ = await asyncio.wait({stdout_task, wait_task, intr_task}, return_when=asyncio.FIRST_COMPLETED)
            # An interrupt accepted before the leader's exit was seen decides the end (InterruptRun said so).
            if self._interrupted():
                end = "interrupted"
            if end != "exit":
                self.log.stop_pacing()
                await terminate_group(proc, escalation)
            elif wait_task not in done:
                # stdout ended (EOF, or the parser saw the terminal event): let the CLI exit by itself.
                done2, _ = await asyncio.wait({wait_task, intr_task}, timeout=cfg.exit_grace_s,
                                              return_when=asyncio.FIRST_COMPLETED)
                if self._interrupted():
                    end = "interrupted"
                if wait_task not in done2:
                    await terminate_group(proc, escalation if end == "interrupted" else escalation[1:])
            await leader_exited(proc)
            self._exited = True
            if group_alive(proc.pid):
                # The leader is gone but something it started lives on: no process is left behind.
                await terminate_group(proc, [(signal.SIGTERM, min(cfg.term_grace_s, 0.5))])
            if self.reaper is not None:
                # What left the process group (setsid) is still in the run's cgroup.
                await self.reaper.kill_leftovers(proc.pid, min(cfg.term_grace_s, 0.5))
            # What the CLI wrote before exiting is read to its end: 5 s, not counting time the pump
            # waits for a follower to catch up (an interrupt or the last detach releases that wait).
            while not stdout_task.done():
                pauses = self.log.pauses
                await asyncio.wait({stdout_task}, timeout=5.0)
                if not self.log.paused and self.log.pauses == pauses:
                    break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(stderr_task), 2.0)
        except BaseException as exc:
            # The agent is shutting down (cancelled), or supervision failed: the CLI must not outlive the run.
            if isinstance(exc, asyncio.CancelledError):
                end = "interrupted"
            else:
                end = "error"
                self._supervision_error = f"{type(exc).__name__}: {exc}"
            await asyncio.shield(terminate_group(proc, [(signal.SIGTERM, min(cfg.term_grace_s, 1.0))]))
            raise
        finally:
            for t in tasks:
                t.cancel()
            if tracked and self.reaper is not None:
                self.reaper.untrack(proc.pid)
            if not self.done:
                self._finish(end, proc.returncode)

    def _finish(self, end: str, rc: int | None) -> None:
        sig = -rc if rc is not None and rc < 0 else 0
        exit_code = rc if rc is not None and rc >= 0 else -1
        if end == "interrupted":
            final = error_event(self._interrupt_message, self._interrupt_kind, "runtime")
            if self._interrupt_reason:
                final.metadata["reason"] = self._interrupt_reason  # which deadline (Result.error.reason)
            self._emit([final])
            # A deadline is the run's failure; an interrupt (a client, a drain, a shutdown) is not.
            status = RunStatus.FAILED if self._interrupt_kind == "timeout" else RunStatus.INTERRUPTED
        elif end == "error":
            # The node failed, not the CLI: say so (kind runtime), and the run fails.
            self._emit([error_event(f"the node failed while supervising the run: {self._supervision_error or 'unknown'}",
                                    "runtime", "runtime")])
            status = RunStatus.FAILED
        else:
            tail = bytes(self._stderr_tail).decode("utf-8", "replace")
            events = self.parser.finish(ExitInfo(returncode=exit_code if not sig else None, signal=sig, stderr_tail=tail))
            self._emit(events)
            failed = any(
                e.kind == _ERROR and is_failure(e.error.severity)
                for e in events
            ) or self.parser.failed
            status = RunStatus.FAILED if failed else RunStatus.COMPLETED
        self._complete(status, exit_code, sig)


def options_from_json(text: str) -> dict[str, object]:
    """A request's options: a JSON object within size, depth and number limits (ConfigError otherwise)."""
    return parse_options_json(text)
