"""The node agent: admission, handshake, preflight and the run registry.

:class:`NodeAgent` implements :class:`asm_wire.NodeApi` in-process. The gRPC
server (:mod:`asm_node.server`) is a thin adapter over it, and the ``asm`` CLI
hands the same object to the controller as an embedded node.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import socket
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path

from asm_node.config import SECRET_ENV, NodeConfig
from asm_node.journal import Journal, JournalEntry
from asm_node.metrics import NodeMetrics
from asm_node.process import Reaper
from asm_node.providers import Provider, ProviderStatus, RunSpec, build_providers
from asm_node.providers.base import remove_run_files
from asm_node.run import ReplayBudget, Run, options_from_json, run_deadlines
from asm_node.workspace import Workspaces
from asm_wire import (
    KIND_NAMES,
    NODE_CAPABILITIES,
    PROTOCOL_VERSION,
    AsmError,
    ConfigError,
    CwdNotAllowed,
    EventKind,
    NodeAtCapacity,
    NodeNotReady,
    ProviderMissing,
    ReplayGap,
    RunNotFound,
    RunStatus,
    __version__,
    choices,
    error_info,
    kind_value,
    make_error,
    node_state_name,
    pb,
    run_status_value,
    ulid,
    valid_id,
)
from asm_wire._principal import check_owner, current_principal, may_access, require_admin

log = logging.getLogger("asm_node.agent")

#: How often the agent checks that its reaper watchdog is alive (it also checks at every spawn).
REAPER_CHECK_S = 1.0

#: What this agent announces in its handshake (the vocabulary is asm_wire.Capability).
CAPABILITIES: tuple[str, ...] = tuple(c.value for c in NODE_CAPABILITIES)
#: ListRuns' status filter: every run status but unspecified.
_LISTED_STATUSES = choices(RunStatus)[1:]


def _status_pb(name: str) -> pb.RunStatus.ValueType:
    """A held or journaled run's status on the wire (a journal's "lost" has no RunStatus: unspecified)."""
    return run_status_value(name) if name in _LISTED_STATUSES else pb.RUN_STATUS_UNSPECIFIED


class NodeAgent:
    """Runs CLIs on this host on behalf of controllers."""

    def __init__(self, config: NodeConfig | None = None, providers: dict[str, Provider] | None = None,
                 metrics: NodeMetrics | None = None) -> None:
        self.config = config or NodeConfig()
        self.providers = providers if providers is not None else build_providers(self.config)
        self.node_id = self.config.node_id
        self.boot_epoch = ulid()
        self.started_ns = time.time_ns()
        self.state = pb.NODE_STATE_READY
        #: Every run the node holds: active ones and retained finished ones (lookup by id).
        self.runs: dict[str, Run] = {}
        # The indexes that keep admission and eviction independent of how many finished runs
        # are retained: the active runs, and the finished ones in finish order (oldest first)
        # with the frame bytes each was counted for.
        self._active: dict[str, Run] = {}
        self._finished: OrderedDict[str, tuple[Run, int]] = OrderedDict()
        self._retained_bytes = 0
        #: Replay frames held by the running runs together (bounded by replay_max_bytes_per_node).
        self.replay_budget = ReplayBudget(self.config.replay_max_bytes_per_node)
        self._reaper = Reaper() if self.config.reaper else None
        self._reaper_watch: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._probe: asyncio.Task[object] | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._drain_deadline_ns = 0
        self._env = self._base_env()
        self.kind_totals = [0] * len(KIND_NAMES)
        self.workspace = Workspaces()
        #: Who made each snapshot (bounded; see _check_snapshot).
        self._snapshot_owners: OrderedDict[str, str] = OrderedDict()
        self.metrics = metrics or NodeMetrics()
        self.metrics.bind(self)
        # Opened here, not in start(): a state dir that cannot be used is a typed error before anything serves.
        self.journal = Journal(self.config.state_dir, self.boot_epoch, self.config.journal_max_age_s,
                               on_failure=lambda op: self.metrics.journal_failures.labels(op).inc(),
                               max_runs=self.config.journal_max_runs)
        if self.journal.lost_at_open:
            log.warning("run journal: %d run(s) were running when the previous agent stopped; they are lost",
                        self.journal.lost_at_open)
        self._pruned_mono = time.monotonic()

    # -- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        if self._reaper is not None:
            self._reaper.start()
            self._reaper_watch = asyncio.create_task(self._watch_reaper())
        # Warm the CLI version cache in the background so the first handshake is quick.
        self._probe = asyncio.create_task(asyncio.to_thread(
            lambda: [p.status(self._env, True) for p in self.providers.values()]))
        self._sweeper = asyncio.create_task(self._sweep())

    async def stop(self, timeout: float = 10.0) -> None:
        """Interrupt every active run, wait (bounded) for their CLIs to be gone, stop the watchdog."""
        self.state = pb.NODE_STATE_STOPPING
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._drain_task is not None:
            self._drain_task.cancel()
        active = [r for r in self.runs.values() if not r.done]
        for run in active:
            # node_shutdown, not user_cancelled: the client should retry elsewhere.
            run.interrupt("node_shutdown", f"node {self.node_id} is shutting down")
        tasks = [r.task for r in active if r.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5.0)
        if self._reaper is not None:
            if self._reaper_watch is not None:
                self._reaper_watch.cancel()
            self._reaper.stop()
        self.journal.close()  # after the runs ended: their outcomes are journaled

    @property
    def reaper_pid(self) -> int | None:
        return self._reaper.pid if self._reaper else None

    @property
    def reaper(self) -> Reaper | None:
        return self._reaper

    async def _watch_reaper(self) -> None:
        """A dead watchdog is logged at ERROR, counted and restarted (process.Reaper.check)."""
        assert self._reaper is not None
        while True:
            await asyncio.sleep(REAPER_CHECK_S)
            self._reaper.check()

    async def _sweep(self) -> None:
        """Age out finished runs: each pass looks at the oldest ones only (O(1 + evicted))."""
        while True:
            await asyncio.sleep(min(max(self.config.retention_s / 4, 0.05), 30.0))
            self._evict()
            if time.monotonic() - self._pruned_mono >= min(self.config.journal_max_age_s / 4, 600.0):
                self._pruned_mono = time.monotonic()
                self.journal.prune()

    def _evict(self) -> None:
        """Drop the oldest finished runs while retention is over its age, count or byte bound.

        A run being streamed to a follower may be evicted: the follower holds the Run object
        and finishes its replay; only a new attach by id gets the unknown-run error. Active
        runs are never in ``_finished``, so they are never evicted.
        """
        cfg = self.config
        finished = self._finished
        cutoff = time.monotonic() - cfg.retention_s
        while finished:
            rid, (run, nbytes) = next(iter(finished.items()))
            if (len(finished) <= cfg.retention_max_runs and self._retained_bytes <= cfg.retention_max_bytes
                    and run.finished_mono >= cutoff):
                return
            finished.popitem(last=False)
            self._retained_bytes -= nbytes
            if self.runs.get(rid) is run:
                del self.runs[rid]

    def _denied_env(self) -> set[str]:
        return {*self.config.env_deny, *SECRET_ENV}

    @property
    def retained_bytes(self) -> int:
        """What retained finished runs hold: frame bytes plus FRAME_OVERHEAD each (``retention_max_bytes``)."""
        return self._retained_bytes

    def _base_env(self) -> dict[str, str]:
        """The agent's environment minus its secrets: what every CLI starts from."""
        deny = self._denied_env()
        return {k: v for k, v in os.environ.items() if k not in deny}

    # -- admission --------------------------------------------------------------

    def active_runs(self) -> int:
        # O(1): admission must not cost more the more finished runs are retained.
        return len(self._active)

    def _provider(self, name: str) -> Provider:
        provider = self.providers.get(name)
        if provider is None:
            known = ", ".join(sorted(self.providers))
            raise ProviderMissing(f"provider {name!r} is not available on node {self.node_id} (available: {known})")
        return provider

    def _resolve_cwd(self, cwd: str) -> str:
        roots = self.config.workspace_roots
        if not cwd:
            return str(roots[0]) if roots else os.getcwd()
        _check_path_text(cwd)  # before any filesystem call: a NUL or an over-long name raises there
        path = Path(os.path.expanduser(cwd))
        if not path.is_absolute():
            raise ConfigError(f"cwd {cwd!r} must be an absolute path")
        try:
            return self._check_cwd(cwd, Path(os.path.realpath(path)), roots)
        except OSError as exc:  # ENAMETOOLONG after expansion, EACCES on a parent, ...
            raise make_error("config_invalid", "config", f"cwd {cwd[:200]!r} cannot be used: {exc.strerror}",
                             reason="cwd_not_found") from None

    def _check_cwd(self, cwd: str, resolved: Path, roots: list[Path]) -> str:
        if roots and not any(resolved == root or resolved.is_relative_to(root) for root in roots):
            raise CwdNotAllowed(
                f"cwd {cwd!r} resolves to {str(resolved)!r}, outside the node's workspace roots "
                f"({', '.join(str(r) for r in roots)})"
            )
        if not resolved.is_dir():
            raise make_error("config_invalid", "config", f"cwd {cwd!r} does not exist or is not a directory",
                             reason="cwd_not_found")
        if not os.access(resolved, os.W_OK | os.X_OK):
            raise CwdNotAllowed(f"cwd {cwd!r} is not writable by the node agent", reason="cwd_not_writable")
        return str(resolved)

    def _admit(self, provider_name: str, cwd: str) -> tuple[Provider, str]:
        if self.state != pb.NODE_STATE_READY:
            raise NodeNotReady(f"node {self.node_id} is {node_state_name(self.state)} and accepts no new runs")
        provider = self._provider(provider_name)
        status = provider.status(self._env, probe_version=False)  # on every run's path: never runs the CLI
        if not status.available:
            raise ProviderMissing(status.error or f"{provider.display_name} is not installed on node {self.node_id}")
        if self.active_runs() >= self.config.max_runs:
            raise NodeAtCapacity(f"node {self.node_id} is at capacity ({self.config.max_runs} runs)")
        return provider, self._resolve_cwd(cwd)

    # -- NodeApi ----------------------------------------------------------------

    def _provider_info(self, provider: Provider, probe_version: bool = False) -> pb.ProviderInfo:
        status: ProviderStatus = provider.status(self._env, probe_version)
        info = pb.ProviderInfo(
            name=provider.name, available=status.available, cli_path=status.cli_path,
            version=status.version, env_var=provider.env_var,
        )
        if status.error:
            info.error.CopyFrom(pb.ErrorInfo(kind="cli_not_found", domain="provider", message=status.error,
                                             reason="provider_missing"))
        return info

    async def handshake(self, request: pb.HandshakeRequest) -> pb.HandshakeResponse:
        cfg = self.config
        # `<cli> --version` can take a second: probe (once per CLI path, cached) off the event loop.
        providers = await asyncio.to_thread(lambda: [self._provider_info(p, True) for p in self.providers.values()])
        return pb.HandshakeResponse(
            agent_version=__version__,
            protocol_version=PROTOCOL_VERSION,
            capabilities=list(CAPABILITIES),
            node_id=self.node_id,
            boot_epoch=self.boot_epoch,
            host=pb.HostFacts(
                hostname=socket.gethostname(), os=platform.system(), arch=platform.machine(),
                python_version=platform.python_version(), cpu_count=os.cpu_count() or 0,
            ),
            providers=providers,
            limits=pb.Limits(
                max_runs=cfg.max_runs, line_cap_bytes=cfg.line_cap_bytes,
                replay_buffer_events=cfg.replay_buffer_events,
                workspace_roots=[str(r) for r in cfg.workspace_roots],
                detach_grace_ms=int(cfg.detach_grace_s * 1000),
            ),
            load=pb.Load(active_runs=self.active_runs(), retained_runs=len(self._finished)),  # finished, attachable
            state=self.state,
            started_unix_nano=self.started_ns,
            labels=dict(cfg.labels),
            drain_deadline_unix_nano=self._drain_deadline_ns,
        )

    async def preflight(self, request: pb.PreflightRequest) -> pb.PreflightResponse:
        try:
            provider, cwd = self._admit(request.provider, request.cwd)
        except AsmError as err:
            self.metrics.rejected.labels(_reject_reason(err)).inc()
            resp = pb.PreflightResponse(ok=False, error=error_info(err))
            if request.provider in self.providers:
                resp.provider.CopyFrom(self._provider_info(self.providers[request.provider]))
            return resp
        return pb.PreflightResponse(ok=True, resolved_cwd=cwd, provider=self._provider_info(provider))

    def _create_run(self, req: pb.StartRunRequest) -> Run:
        # Everything from the lookup to the insert is synchronous: two concurrent
        # StartRun calls with one run_id can never both launch a CLI.
        provider, cwd = self._admit(req.provider, req.cwd)
        session_id = req.session_id or req.run_id
        if not valid_id(session_id):
            raise ConfigError(f"invalid session_id {session_id!r}: use 1-128 characters of [A-Za-z0-9._:-]")
        if any("\0" in k or "=" in k or "\0" in v for k, v in req.env.items()):
            raise ConfigError("environment variable names and values must not contain NUL (nor names '=')")
        denied = self._denied_env()
        refused = sorted(k for k in req.env if k not in self.config.env_allow or k in denied)
        if refused:
            raise ConfigError(
                f"environment variable(s) not allowed by this node: {', '.join(refused)} "
                "(the operator allows them with --env-allow)"
            )
        # The deadlines are the node's supervision: taken out before the provider sees the options.
        deadlines, options_in = run_deadlines(options_from_json(req.options_json), req.approval_timeout_ms,
                                              self.config)
        _check_approvals(provider, options_in)
        try:
            options = provider.validate_options(options_in, req.permission_mode or "default")
        except (ValueError, OverflowError, TypeError) as exc:  # a provider's own conversion of a client value
            raise ConfigError(f"invalid {provider.name} options: {exc}") from None
        env = dict(self._env)
        env.update(req.env)
        spec = RunSpec(
            run_id=req.run_id, session_id=session_id, provider=provider.name, prompt=req.prompt, cwd=cwd,
            permission_mode=req.permission_mode or "default", options=options, env=env,
        )
        command = provider.build_command(spec)
        # exec() refuses NUL in argv/env: refused here, typed, before a run (and a slot) exists.
        if any("\0" in a for a in command.argv) or any("\0" in k or "\0" in v for k, v in command.env.items()):
            remove_run_files(command.run_files)
            raise ConfigError("the prompt or options contain a NUL byte, which no command line can carry",
                              reason="nul_byte")
        owner = current_principal().name
        # Journaled before the Run exists and its CLI is spawned: a restart can never forget this id.
        # An id the journal cannot record is refused (NodeNotReady, journal_unavailable): nothing runs.
        try:
            self.journal.started(req.run_id, owner, session_id, provider.name, time.time_ns())
        except AsmError:
            remove_run_files(command.run_files)
            raise
        run = Run(spec, command, provider.new_parser(spec), self.config, self._reaper, self._run_finished, self.metrics,
                  self.replay_budget, deadlines)
        run.owner = owner  # before the run's task first runs
        self.metrics.runs_started.labels(provider.name).inc()
        self._register(run)
        run.task = asyncio.create_task(run.main(), name=f"run-{req.run_id}")
        return run

    def _register(self, run: Run) -> None:
        rid = run.spec.run_id
        self.runs[rid] = run
        self._active[rid] = run

    def _run_finished(self, run: Run) -> None:
        rid = run.spec.run_id
        if self._active.get(rid) is run:
            del self._active[rid]
            nbytes = run.held_cost  # what the held frames cost in memory, as every other bound counts
            self._finished[rid] = (run, nbytes)
            self._retained_bytes += nbytes
            self._evict()  # incremental: at most the runs now over a bound
        log.info("run %s finished: %s (exit %s)", run.spec.run_id, run.status, run.exit_code)
        self.journal.finished(rid, run.status, run.exit_code, run.last_seq, run.finished_ns, run.first_error)
        self.kind_totals = [a + b for a, b in zip(self.kind_totals, run.kind_counts, strict=True)]
        run.counted = True
        m = self.metrics
        m.runs_finished.labels(run.spec.provider, run.status).inc()
        m.run_duration.labels(run.spec.provider).observe((run.finished_ns - run.started_ns) / 1e9)

    def _get(self, run_id: str) -> Run:
        run = self.runs.get(run_id)
        if run is None:
            raise RunNotFound(f"Unknown run id: {run_id}")
        check_owner(run.owner, f"run {run_id}")
        return run

    def _journaled(self, run_id: str) -> JournalEntry | None:
        """The journal's entry of a run this node no longer holds: owner-checked; run_lost if it never ended."""
        entry = self.journal.get(run_id)
        if entry is None:
            return None
        check_owner(entry.owner, f"run {run_id}")
        if entry.status == "running":
            # Not held although journaled as running: a previous agent (another epoch) started it and
            # is gone (such entries are marked lost at open), or this run's end failed to be written.
            self.journal.mark_lost(run_id)
        elif entry.status != "lost":
            return entry
        why = ("its end was not journaled (a journal write failed)" if entry.epoch == self.boot_epoch else
               f"it was running when the node's agent stopped (epoch {entry.epoch}, now {self.boot_epoch})")
        raise make_error("run_lost", "runtime", f"run {run_id} on node {self.node_id} is lost: {why}; "
                         "its outcome is unknown and it is not run again", reason="run_lost")

    def _ended_frames(self, entry: JournalEntry, after_seq: int) -> AsyncIterator[bytes]:
        """A journaled run's outcome as its last events: its failing error (if any) and its run_completed.

        They carry the seqs the run's own last events had (run_completed was its last, ``last_seq``),
        so a follower's reducer ends with the journaled status and exit code, and one that already
        saw them gets nothing. ``metadata["origin"] = "node_journal"`` says they are a summary.
        A follower that already saw some events (``after_seq > 0``) but not up to those kept gets
        :class:`ReplayGap` naming the seqs in between, as a held run whose events are evicted
        gives it: it is never handed the end over a silent hole. ``after_seq=0`` (a new caller,
        which has seen nothing) gets the summary.
        """
        self.metrics.attaches.inc()
        events = []
        if entry.error_kind or entry.status in (RunStatus.FAILED, RunStatus.INTERRUPTED):
            code = entry.error_kind or ("user_cancelled" if entry.status == RunStatus.INTERRUPTED else "runtime")
            events.append(pb.Event(kind=kind_value(EventKind.ERROR), error=pb.Error(
                code=code, domain=entry.error_domain or "runtime", severity=pb.SEVERITY_ERROR, exit_code=-1,
                message=entry.error_message or f"run {entry.run_id} {entry.status}")))
            if entry.error_reason:  # which deadline, or another typed cause (Result.error.reason)
                events[-1].metadata["reason"] = entry.error_reason
        duration_ms = max(0, (entry.finished_ns - entry.started_ns) // 1_000_000)
        events.append(pb.Event(kind=kind_value(EventKind.RUN_COMPLETED), run_completed=pb.RunCompleted(
            status=entry.status, exit_code=entry.exit_code, duration_ms=duration_ms)))
        first = entry.last_seq - len(events) + 1
        kept = max(first, 1)
        if 0 < after_seq and after_seq + 1 < kept:
            self.metrics.overflows.labels("replay").inc()
            raise ReplayGap(
                f"events {after_seq + 1}..{kept - 1} of run {entry.run_id} are no longer held (the run ended "
                f"and was evicted; the node's journal keeps its outcome only: events {kept}..{entry.last_seq})")
        batch = pb.EventBatch()
        for seq, ev in enumerate(events, start=first):
            if seq <= after_seq or seq < 1:
                continue
            ev.id, ev.run_id, ev.session_id, ev.provider = f"{entry.run_id}:{seq}", entry.run_id, entry.session_id, entry.provider
            ev.seq, ev.timestamp_unix_nano = seq, entry.finished_ns
            ev.metadata["origin"] = "node_journal"
            batch.events.append(ev)
        return _frames_of(batch)

    def start_run_frames(self, request: pb.StartRunRequest) -> AsyncIterator[bytes]:
        """Start or attach; serialized EventBatch messages (the gRPC server sends them as is)."""
        if not valid_id(request.run_id):
            raise ConfigError(f"invalid run_id {request.run_id!r}: use 1-128 characters of [A-Za-z0-9._:-]")
        run = self.runs.get(request.run_id)
        if run is None:
            # An id this node started before (evicted since, or before a restart) never runs again.
            entry = self._journaled(request.run_id)
            if entry is not None:
                return self._ended_frames(entry, request.after_seq)
            try:
                run = self._create_run(request)
            except AsmError as err:
                self.metrics.rejected.labels(_reject_reason(err)).inc()
                raise
        else:
            # Another principal's run id is refused, never attached to.
            check_owner(run.owner, f"run {request.run_id}")
            self._count_attach(run, request.after_seq)
        return run.follow(request.after_seq)

    def attach_run_frames(self, request: pb.AttachRunRequest) -> AsyncIterator[bytes]:
        if request.run_id not in self.runs:
            entry = self._journaled(request.run_id)
            if entry is not None:
                return self._ended_frames(entry, request.after_seq)
        run = self._get(request.run_id)
        self._count_attach(run, request.after_seq)
        return run.follow(request.after_seq)

    def _count_attach(self, run: Run, after_seq: int) -> None:
        self.metrics.attaches.inc()
        self.metrics.replayed.inc(max(0, run.last_seq - after_seq))

    async def start_run(self, request: pb.StartRunRequest) -> AsyncIterator[pb.EventBatch]:
        async for data in self.start_run_frames(request):
            yield pb.EventBatch.FromString(data)

    async def attach_run(self, request: pb.AttachRunRequest) -> AsyncIterator[pb.EventBatch]:
        async for data in self.attach_run_frames(request):
            yield pb.EventBatch.FromString(data)

    async def interrupt_run(self, request: pb.InterruptRunRequest) -> pb.InterruptRunResponse:
        return pb.InterruptRunResponse(accepted=self._get(request.run_id).interrupt())

    async def resolve_approval(self, request: pb.ResolveApprovalRequest) -> pb.ResolveApprovalResponse:
        self._get(request.run_id).resolve_approval(request.approval_id, request.decision, request.reason)
        return pb.ResolveApprovalResponse()

    async def send_input(self, request: pb.SendInputRequest) -> pb.SendInputResponse:
        await self._get(request.run_id).send_input(request.data, request.end_input)
        return pb.SendInputResponse()

    async def get_run(self, request: pb.GetRunRequest) -> pb.RunInfo:
        if request.run_id not in self.runs:
            entry = self._journaled(request.run_id)
            if entry is not None:  # nothing is held: first_held_seq is past the end
                return pb.RunInfo(
                    run_id=entry.run_id, session_id=entry.session_id, provider=entry.provider,
                    status=_status_pb(entry.status), last_seq=entry.last_seq,
                    first_held_seq=entry.last_seq + 1, exit_code=entry.exit_code, started_unix_nano=entry.started_ns,
                    finished_unix_nano=entry.finished_ns, owner=entry.owner)
        return self._get(request.run_id).info()

    async def drain(self, request: pb.DrainRequest) -> pb.DrainResponse:
        """Refuse new runs from now on; interrupt the ones still running at the deadline."""
        require_admin("Drain")
        if self.state == pb.NODE_STATE_READY:
            self.state = pb.NODE_STATE_DRAINING
            deadline_s = request.deadline_ms / 1000
            self._drain_deadline_ns = time.time_ns() + int(deadline_s * 1e9)
            self._drain_task = asyncio.create_task(self._drain(deadline_s))
            log.warning("node %s draining: %d active run(s), deadline %.1fs", self.node_id, self.active_runs(), deadline_s)
        return pb.DrainResponse(state=self.state, active_runs=self.active_runs(),
                                deadline_unix_nano=self._drain_deadline_ns)

    async def _drain(self, deadline_s: float) -> None:
        tasks = [r.task for r in self._active.values() if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=deadline_s)
            for run in list(self._active.values()):
                run.interrupt("node_draining", f"node {self.node_id} is draining: its deadline of "
                                               f"{deadline_s:g}s passed")

    async def undrain(self, request: pb.UndrainRequest) -> pb.DrainResponse:
        """Cancel a drain: take runs again; the runs still going are not interrupted at the old deadline."""
        require_admin("Undrain")
        if self.state == pb.NODE_STATE_DRAINING:
            if self._drain_task is not None:
                self._drain_task.cancel()
                self._drain_task = None
            self._drain_deadline_ns = 0
            self.state = pb.NODE_STATE_READY
            log.warning("node %s undrained: taking runs again (%d active)", self.node_id, self.active_runs())
        elif self.state != pb.NODE_STATE_READY:
            raise NodeNotReady(f"node {self.node_id} is {node_state_name(self.state)}: it cannot be undrained")
        return pb.DrainResponse(state=self.state, active_runs=self.active_runs(), deadline_unix_nano=0)

    # -- workspace snapshots (asm_node.workspace does the work, off the event loop) ---------

    async def snapshot(self, request: pb.SnapshotRequest) -> pb.SnapshotInfo:
        cwd = self._resolve_cwd(request.cwd)
        owner = current_principal().name
        info = await asyncio.to_thread(self.workspace.snapshot, cwd, request.backend or "git", request.label)
        self._snapshot_owners[info.id] = owner
        while len(self._snapshot_owners) > _MAX_SNAPSHOT_OWNERS:
            self._snapshot_owners.popitem(last=False)
        return info

    def _check_snapshot(self, snapshot_id: str) -> None:
        """A snapshot is its maker's: diffing or rolling back another principal's is PERMISSION_DENIED.

        Git snapshots outlive the agent (refs) but their makers do not: one made before this agent
        started (or forgotten past the bound) is an admin's only.
        """
        owner = self._snapshot_owners.get(snapshot_id)
        if owner is None:
            if snapshot_id and not current_principal().admin:
                require_admin(f"snapshot {snapshot_id[:80]!r} has no known maker on this node; using it")
            return
        check_owner(owner, f"snapshot {snapshot_id[:80]!r}")

    async def diff(self, request: pb.DiffRequest) -> pb.DiffResponse:
        cwd = self._resolve_cwd(request.cwd)
        self._check_snapshot(request.from_id)
        self._check_snapshot(request.to_id)
        return await asyncio.to_thread(self.workspace.diff, cwd, request.from_id, request.to_id,
                                       request.max_patch_bytes or 256 * 1024)

    async def rollback(self, request: pb.RollbackRequest) -> pb.RollbackResponse:
        cwd = self._resolve_cwd(request.cwd)
        self._check_snapshot(request.snapshot_id)
        return await asyncio.to_thread(self.workspace.rollback, cwd, request.snapshot_id)

    async def list_runs(self, request: pb.ListRunsRequest) -> pb.ListRunsResponse:
        """The runs held (in start order), optionally of one status; the newest ``limit`` (0: 1000)."""
        controller_only = [name for name in ("session_id", "provider", "node", "since_unix_nano", "until_unix_nano",
                                             "page_token") if getattr(request, name)]
        if controller_only:
            raise ConfigError(f"ListRuns filter(s) {', '.join(controller_only)} are answered by a controller's "
                              "registry; a node lists the runs it holds (status, active_only, limit)",
                              reason="controller_only")
        status = request.status
        if status and status not in _LISTED_STATUSES:
            raise ConfigError(f"unknown run status {status[:64]!r}: use one of {', '.join(_LISTED_STATUSES)}")
        runs = [r for r in self.runs.values()
                if not (request.active_only and r.done) and (not status or r.status == status) and may_access(r.owner)]
        limit = request.limit or LIST_RUNS_LIMIT
        return pb.ListRunsResponse(runs=[r.info() for r in runs[-limit:]])

    async def list_provider_sessions(self, request: pb.ListProviderSessionsRequest) -> pb.ListProviderSessionsResponse:
        """The resumable sessions ``request.provider``'s CLI keeps on this host, newest first (admin only: the
        CLI stores are the host's, not any one principal's). ``node`` is the controller's field: ignored."""
        require_admin("ListProviderSessions")
        provider = self.providers.get(request.provider)
        if provider is None:
            raise ConfigError(f"unknown provider {request.provider[:64]!r}: use one of {', '.join(sorted(self.providers))}",
                              reason="unknown_provider")
        env = self._base_env()
        sessions = await asyncio.to_thread(provider.list_sessions, env, request.limit)
        return pb.ListProviderSessionsResponse(sessions=sessions)

#: ListRuns answers at most this many runs when the request sets no limit.
LIST_RUNS_LIMIT = 1000


_MAX_SNAPSHOT_OWNERS = 10_000
#: Linux's NAME_MAX and PATH_MAX: longer names fail in the kernel anyway, with ENAMETOOLONG.
MAX_PATH_COMPONENT_BYTES = 255
MAX_PATH_BYTES = 4096


def _check_approvals(provider: Provider, options: dict[str, object]) -> None:
    """``approvals=true`` for a CLI that never asks (Codex exec, Gemini headless, Amp --execute): refused with
    the provider's own reason, not as a mere unknown option."""
    value = options.get("approvals")
    if value in (None, False, 0, "") or (isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off")):
        return
    feature = provider.features.get("approvals")
    if not isinstance(feature, tuple) or not feature or feature[0]:
        return  # supported (or not declared: the provider's own validation decides)
    why = feature[1] if len(feature) > 1 and feature[1] else "its CLI never asks for permission when run headless"
    raise ConfigError(f"provider {provider.name} cannot ask for approvals ({why}): approvals=true is not available; "
                      "choose what it may do with the permission mode instead (--permission-mode)",
                      reason="approvals_unsupported")


def _check_path_text(path: str) -> None:
    """A client's path as text: no NUL byte, no component over 255 bytes, at most 4096 bytes in all."""
    if "\0" in path:
        raise ConfigError("cwd must not contain a NUL byte")
    size = len(path.encode("utf-8", "surrogateescape"))
    if size > MAX_PATH_BYTES:
        raise ConfigError(f"cwd is {size} bytes long: the limit is {MAX_PATH_BYTES} bytes")
    longest = max((len(part.encode("utf-8", "surrogateescape")) for part in path.split("/")), default=0)
    if longest > MAX_PATH_COMPONENT_BYTES:
        raise ConfigError(f"cwd has a {longest}-byte path component: the limit is {MAX_PATH_COMPONENT_BYTES} bytes")


async def _frames_of(batch: pb.EventBatch) -> AsyncIterator[bytes]:
    if batch.events:
        yield batch.SerializeToString()


def _reject_reason(err: AsmError) -> str:
    if isinstance(err, NodeAtCapacity):
        return "capacity"
    if isinstance(err, NodeNotReady):
        return "not_ready"
    if isinstance(err, ProviderMissing | CwdNotAllowed) or err.reason == "cwd_not_found":
        return "preflight"
    return "config"
