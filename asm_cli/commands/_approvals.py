"""Approvals a person answers from ``asm run`` and ``asm attach``: ``--approve allow|deny|prompt``, the
terminal's question, or the ``asm approve`` command to answer from another shell."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

from asm_wire import KIND_VALUES, ApprovalNotFound, AsmError, ConfigError, Decision

if TYPE_CHECKING:
    from asm_controller import Event, Session

#: ``--approve``: answer every approval (allow, deny), ask on the terminal (prompt); without it a terminal
#: is asked, anything else waits for ``asm approve`` from another shell ("wait").
APPROVE_MODES = ("allow", "deny", "prompt")
_APPROVAL_REQUESTED, _APPROVAL_RESOLVED = KIND_VALUES["approval_requested"], KIND_VALUES["approval_resolved"]
#: The events Approvals.on_event acts on.
APPROVAL_KINDS = frozenset({_APPROVAL_REQUESTED, _APPROVAL_RESOLVED})


def approval_mode(args: argparse.Namespace) -> str:
    """allow / deny / prompt / wait (see APPROVE_MODES); ``--approve prompt`` needs a terminal to ask on.
    A command without ``--approve`` (``asm logs --follow``, which is ``asm attach``) gets the default."""
    terminal = sys.stdin.isatty() and sys.stderr.isatty()
    chosen = getattr(args, "approve", None)
    if chosen == "prompt" and not terminal:
        raise ConfigError("--approve prompt needs a terminal (stdin and stderr): use --approve allow|deny, or answer "
                          "with 'asm approve' from another shell (the default without a terminal)")
    if chosen:
        return str(chosen)
    return "prompt" if terminal and args.output == "text" else "wait"


async def _read_line(fd: int) -> str:
    """One line typed on the terminal, read without blocking the event loop (events keep coming); '' at EOF."""
    import asyncio

    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()

    def readable() -> None:
        if not got.done():
            try:
                got.set_result(os.read(fd, 4096))
            except OSError:
                got.set_result(b"")

    loop.add_reader(fd, readable)
    try:
        return (await got).decode("utf-8", "replace")
    finally:
        loop.remove_reader(fd)


class Approvals:
    """``asm run``'s (and ``asm attach``'s) side of approvals: answer each ``approval_requested`` as
    ``--approve`` says, ask the user (one question at a time, while the run's events keep streaming), or
    say how to answer from another shell; note the ones nobody answered (denied by the node's timeout).
    ``command`` names the asking command in the reasons it sends ("asm run", "asm attach")."""

    def __init__(self, session: Session, mode: str, rendering: Any, hint: str, command: str = "asm run") -> None:
        import asyncio

        self.command = command
        self.session = session
        self.mode = mode
        self.rendering = rendering
        #: How to reach this run from another shell ("--node A" / "--controller C"), "" for an embedded node.
        self.hint = hint
        self.allow_all = False
        self.timed_out: list[str] = []
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._asking = asyncio.Lock()

    def on_event(self, ev: Event) -> None:
        kind = ev.pb.kind  # (an int compare: this runs for every event of the run)
        if kind == _APPROVAL_REQUESTED:
            import asyncio

            p = ev.pb.approval_requested
            self._tasks[p.approval_id] = asyncio.get_running_loop().create_task(self._answer(ev))
        elif kind == _APPROVAL_RESOLVED:
            r = ev.pb.approval_resolved
            task = self._tasks.pop(r.approval_id, None)
            if task is not None and not task.done():
                task.cancel()  # answered elsewhere (asm approve, the timeout, an interrupt): stop asking
                if self.mode == "prompt":
                    sys.stderr.write(f"\nasm: approval {r.approval_id} was answered meanwhile: {r.decision}"
                                     f"{f' ({r.reason})' if r.reason else ''}\n")
            if r.reason == "timeout":
                self.timed_out.append(r.approval_id)

    async def _answer(self, ev: Event) -> None:
        p = ev.pb.approval_requested
        if self.mode in (Decision.ALLOW, Decision.DENY):
            await self._send(ev, self.mode, f"{self.command} --approve {self.mode}")
        elif self.mode == "prompt":
            async with self._asking:
                if self.allow_all:
                    await self._send(ev, Decision.ALLOW, f"allowed for the rest of the run ({self.command}: a)")
                    return
                decision, reason = await self._ask(p.subject, p.details_json)
                await self._send(ev, decision, reason)
        elif self.hint:
            hint = self.hint
            run = self.session.get_run(ev.run_id)
            address = run.result().metadata.get("node_address") if run is not None else None
            if hint.startswith("--node ") and isinstance(address, str) and address:
                hint = f"--node {address}"  # the node the run landed on (several --node: failover)
            sys.stderr.write(f"asm: approval {p.approval_id} ({p.subject or 'tool call'}) is waiting; answer it from "
                             f"another shell: asm approve {ev.run_id} {p.approval_id} allow|deny {hint}\n")
            sys.stderr.flush()
        else:
            sys.stderr.write(f"asm: approval {p.approval_id} ({p.subject or 'tool call'}) is waiting, but this run's "
                             "node is embedded in this asm process, so 'asm approve' cannot reach it: it is denied "
                             "when its approval timeout passes (answer with --approve allow|deny, run on a terminal, "
                             "or run on a served node with --node)\n")
            sys.stderr.flush()

    async def _ask(self, subject: str, details_json: str) -> tuple[str, str]:
        from asm_cli import ui

        shown, question = ui.approval_question(subject, details_json)
        with ui.suspended(self.rendering):
            if shown:
                sys.stderr.write(shown + "\n")
            while True:
                sys.stderr.write(question)
                sys.stderr.flush()
                answer = (await _read_line(sys.stdin.fileno())).strip().lower()
                if answer in ("y", "yes"):
                    return Decision.ALLOW, f"allowed at the terminal ({self.command})"
                if answer in ("a", "all", "always"):
                    self.allow_all = True
                    return Decision.ALLOW, f"allowed at the terminal, with every later approval of the run ({self.command}: a)"
                if answer in ("", "n", "no"):
                    return Decision.DENY, f"denied at the terminal ({self.command})"
                sys.stderr.write("asm: answer y (allow), n (deny, the default) or a (allow this and the rest of the run)\n")

    async def _send(self, ev: Event, decision: str, reason: str) -> None:
        approval_id = ev.pb.approval_requested.approval_id
        try:
            await self.session.approve(approval_id, decision, reason)
        except ApprovalNotFound:
            sys.stderr.write(f"asm: approval {approval_id} is no longer pending (answered elsewhere, timed out, "
                             "or the run ended): this answer was not sent\n")
        except AsmError as err:
            sys.stderr.write(f"asm: warning: could not send the answer to approval {approval_id}: {err.message}\n")

    async def close(self) -> None:
        import asyncio

        tasks = [t for t in self._tasks.values() if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
