"""``run_fn`` adapters: a chat completion as a run of the fleet service, or of a Session.

The options a completion cannot carry (cwd, permission mode, node selector, ...) are the server's: a
chat request names only the provider, its model and the prompt. Mind ``permission_mode``: with
``default`` a CLI that wants to use a tool waits for an approval no chat client will give.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

from asm_controller._events import Event
from asm_controller._session import Session
from asm_controller.inference._modelid import models_of
from asm_controller.inference._router import CompletionCall, RunFn
from asm_wire import pb
from asm_wire._principal import acting_as


class StartsRuns(Protocol):
    """What :func:`fleet_run_fn` needs of the controller's FleetApi."""

    def start_run(self, request: pb.StartRunRequest) -> AsyncIterator[pb.EventBatch]: ...

    async def interrupt_run(self, request: pb.InterruptRunRequest) -> pb.InterruptRunResponse: ...


def _options(call: CompletionCall, options: Mapping[str, Any] | None,
             provider_options: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    out = {**(options or {}), **((provider_options or {}).get(call.provider) or {})}
    # The model id's model wins over the server's default. A lease must name a model (ASM's
    # missing_model_identity) even for a provider without models (shell): there it is a label only.
    if call.model and (call.lease_ref is None or models_of(call.provider)):
        out["model"] = call.model
    return out


def fleet_run_fn(api: StartsRuns, *, cwd: str = "", permission_mode: str = "default",
                 options: Mapping[str, Any] | None = None, approval_timeout_ms: int = 0,
                 queue_timeout_ms: int = 0, session_id: str = "",
                 provider_options: Mapping[str, Mapping[str, Any]] | None = None) -> RunFn:
    """Each completion a ``StartRun`` of the fleet (routing, failover, the queue, the registry), as its caller.

    A chat request names only ``provider[:model]``: ``options`` (every provider) and ``provider_options``
    (one provider's, e.g. ``{"codex": {"skip_git_repo_check": True}}``) are the server's defaults; the
    model id's model wins over both."""

    async def run(call: CompletionCall) -> AsyncIterator[list[Event]]:
        request = pb.StartRunRequest(
            run_id=call.run_id, session_id=session_id, provider=call.provider, prompt=call.prompt, cwd=cwd,
            permission_mode=permission_mode, options_json=json.dumps(_options(call, options, provider_options)),
            approval_timeout_ms=approval_timeout_ms, queue_timeout_ms=queue_timeout_ms,
        )
        ended = False
        with acting_as(call.principal, "POST /v1/chat/completions"):
            try:
                async for batch in api.start_run(request):
                    events = [Event(m) for m in batch.events]
                    ended = ended or any(m.kind == pb.EVENT_KIND_RUN_COMPLETED for m in batch.events)
                    yield events
                ended = True
            finally:
                if not ended:
                    # The client went away before the answer ended (ASM: halting the stream cancels the run):
                    # the CLI is interrupted rather than left working for nobody. A task of its own: this
                    # generator is being closed inside the cancelled response (an await here would be cancelled
                    # too); it runs as the caller (the context, with its principal, is copied).
                    task = asyncio.get_running_loop().create_task(_interrupt(api, call.run_id))
                    _INTERRUPTS.add(task)
                    task.add_done_callback(_INTERRUPTS.discard)

    return run


#: Interrupts of abandoned completions still being sent (a reference keeps each task alive).
_INTERRUPTS: set[asyncio.Task[None]] = set()


async def _interrupt(api: StartsRuns, run_id: str) -> None:
    with contextlib.suppress(Exception):
        await api.interrupt_run(pb.InterruptRunRequest(run_id=run_id))


def session_run_fn(session: Session, **overrides: Any) -> RunFn:
    """Each completion a run of ``session`` (its nodes and defaults; ``overrides`` as ``Session.stream``'s)."""

    def run(call: CompletionCall) -> AsyncIterator[list[Event]]:
        opts = {**overrides, "options": _options(call, overrides.get("options"))}
        return session.stream(call.prompt, provider=call.provider, run_id=call.run_id, owner=call.principal.name,
                              **opts).batches()

    return run
