"""A run's events as a chat completion: the non-stream response, or the stream of chunks.

One :class:`CompletionBuilder` per run folds the events (with the controller's :class:`EventReducer`,
so the Result is the one ``Session.query`` gives) and yields the text as it arrives. Text is never
doubled when a provider sends deltas and then the full message: only what the message adds is sent.

Stream frames, in order: a first chunk with ``role: assistant`` (ASM sent none), one chunk per piece of
text, a last chunk with an empty delta and the ``finish_reason``, then -- asked for with
``stream_options.include_usage`` -- a chunk with no choices and the ``usage``, then, if the run failed,
an ``{"error": ...}`` frame (the openai client raises it as APIError; ASM surfaced a failure only in
finish_reason), and ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable
from typing import Final

from asm_controller._events import Event
from asm_controller._reducer import INTERRUPT_KINDS, Cost, EventReducer, Result, TextFold, message_text
from asm_controller.inference._errors import InferenceError, from_asm_error
from asm_controller.inference._openai import (
    SSE_DONE,
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChunkChoice,
    Delta,
    ResponseMessage,
    Usage,
)
from asm_wire import AsmError

log = logging.getLogger("asm.inference")

#: "success": the Gemini node's stop reason (its CLI's result status), else every Gemini answer ended "success".
_STOP: Final = frozenset({"", "end_turn", "stop", "stop_sequence", "exit", "completed", "success"})
_LENGTH: Final = frozenset({"length", "max_tokens", "max_output_tokens"})
_TOOLS: Final = frozenset({"tool_calls", "tool_use"})


def finish_reason(result: Result) -> str:
    """ASM's mapping of how a run ended to OpenAI's ``finish_reason``.

    end_turn / stop / none -> "stop"; length -> "length"; tool_calls -> "tool_calls"; a cancelled run
    -> "cancelled"; a failed run -> its error kind ("other atoms -> their name"); any other stop reason
    unchanged. Also (asm): Claude's ``max_tokens`` and Gemini's ``MAX_TOKENS`` are "length", a stop
    reason is compared case-insensitively, and a node's drain/shutdown interrupt is "cancelled" too.
    """
    if result.error is not None:
        return "cancelled" if result.error.kind in INTERRUPT_KINDS else result.error.kind
    reason = (result.stop_reason or "").strip()
    key = reason.lower()
    if key in _STOP:
        return "stop"
    if key in _LENGTH:
        return "length"
    if key in _TOOLS:
        return "tool_calls"
    if key in ("user_cancelled", "cancelled"):
        return "cancelled"
    return reason


def usage(cost: Cost) -> Usage:
    """``usage`` from the run's cost (ASM sent none): input tokens are the prompt's, output the answer's."""
    return Usage(prompt_tokens=cost.input_tokens, completion_tokens=cost.output_tokens,
                 total_tokens=cost.input_tokens + cost.output_tokens)


class CompletionBuilder:
    """Folds one run's events into a chat completion (see the module docstring)."""

    def __init__(self, completion_id: str, model: str, *, created: int | None = None) -> None:
        self.id = completion_id
        self.model = model
        self.created = int(time.time()) if created is None else created
        self._reducer: EventReducer | None = None
        self._text = TextFold(keep=False)  # the reducer's rule: new text and paragraph breaks, never doubled
        self._ran = False

    @property
    def ran(self) -> bool:
        """Some event came from a node (not only the controller's own: a run refused before any node took it)."""
        return self._ran

    @property
    def finished(self) -> bool:
        return self._reducer is not None and self._reducer.finished

    def feed(self, events: Iterable[Event]) -> list[str]:
        """Fold events in; the new pieces of answer text they carry."""
        out: list[str] = []
        for ev in events:
            if self._reducer is None:
                self._reducer = EventReducer(ev.run_id, ev.session_id, ev.provider)
            if not self._reducer.apply(ev):
                continue  # a duplicate (a re-attach replays): its text was sent
            if not self._ran and ev.pb.metadata.get("origin") != "controller":
                self._ran = True
            kind = ev.kind
            if kind == "assistant_delta":
                d = ev.pb.assistant_delta
                piece = "".join(self._text.delta(d.content or d.data.decode("utf-8", "replace")))
            elif kind == "assistant_message":
                piece = "".join(self._text.message(message_text(ev.pb.assistant_message)))
            else:
                piece = ""
                if kind in ("tool_use", "tool_result"):
                    self._text.seal()
            if piece:
                out.append(piece)
        return out

    def result(self) -> Result | None:
        return self._reducer.result() if self._reducer is not None else None

    def _final(self) -> Result:
        result = self.result()
        if result is None or not self.finished:
            raise InferenceError(502, "the run ended without a result (its stream was cut: attach to the run "
                                 f"{result.run_id if result else '?'} to read it)", code="run_incomplete")
        return result

    def response(self) -> ChatCompletion:
        """The non-stream answer; a failed run raises its :class:`InferenceError` (ASM: a 500)."""
        result = self._final()
        if result.error is not None:
            raise from_asm_error(result.error, ran=self._ran)
        return ChatCompletion(
            id=self.id, created=self.created, model=self.model,
            choices=[Choice(message=ResponseMessage(content=result.text), finish_reason=finish_reason(result))],
            usage=usage(result.cost),
        )

    def chunk(self, delta: Delta, finish: str | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                   choices=[ChunkChoice(delta=delta, finish_reason=finish)])

    def chunk_for(self, text: str) -> ChatCompletionChunk:
        """A chunk carrying one piece of answer text."""
        return self.chunk(Delta(content=text))

    def first_chunk(self) -> ChatCompletionChunk:
        return self.chunk(Delta(role="assistant", content=""))

    def closing_frames(self, include_usage: bool = False) -> list[str]:
        """The last chunk (finish_reason), the usage chunk if asked for, an error frame if the run failed, [DONE]."""
        try:
            result = self._final()
        except InferenceError as e:
            return [f"data: {e.body().model_dump_json()}\n\n", SSE_DONE]
        frames = [self.chunk(Delta(), finish_reason(result)).sse()]
        if include_usage:
            frames.append(ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[],
                                              usage=usage(result.cost)).sse())
        if result.error is not None:
            frames.append(f"data: {from_asm_error(result.error, ran=self._ran).body().model_dump_json()}\n\n")
        frames.append(SSE_DONE)
        return frames


async def complete(batches: AsyncIterator[list[Event]], builder: CompletionBuilder) -> ChatCompletion:
    """Read a run to its end and answer it (non-stream)."""
    async for batch in batches:
        builder.feed(batch)
    return builder.response()


#: An SSE comment: ignored by clients, it keeps proxies and idle timeouts from cutting a quiet stream.
KEEPALIVE = ": keep-alive\n\n"


_Item = list[Event] | AsmError | InferenceError | None


async def _pump(batches: AsyncIterator[list[Event]], out: asyncio.Queue[_Item]) -> None:
    try:
        async for batch in batches:
            await out.put(batch)
    except (AsmError, InferenceError) as e:
        await out.put(e)
        return
    except Exception as e:  # a defect in run_fn: end the stream with it rather than keep it alive for ever
        log.exception("chat completion stream failed")
        await out.put(InferenceError(500, f"the run's event stream failed: {e!r}"))
        return
    await out.put(None)


async def sse_frames(batches: AsyncIterator[list[Event]], builder: CompletionBuilder, *,
                     include_usage: bool = False, keepalive_s: float | None = 15.0) -> AsyncIterator[str]:
    """A run as SSE frames (see the module docstring); ends with ``data: [DONE]``.

    While the run is quiet (a CLI thinking or running tools for minutes), a keep-alive comment every
    ``keepalive_s``. Closing the generator (the client went away) stops reading the run.
    """
    yield builder.first_chunk().sse()
    queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=1)
    pump = asyncio.create_task(_pump(batches, queue))
    try:
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), keepalive_s)
            except TimeoutError:
                yield KEEPALIVE
                continue
            if item is None:
                break
            if isinstance(item, AsmError | InferenceError):
                # The headers are out: the failure can only travel in the stream (the openai client raises it).
                err = item if isinstance(item, InferenceError) else from_asm_error(item, ran=builder.ran)
                yield f"data: {err.body().model_dump_json()}\n\n"
                yield SSE_DONE
                return
            for text in builder.feed(item):
                yield builder.chunk_for(text).sse()
    finally:
        if not pump.done():
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
    for frame in builder.closing_frames(include_usage):
        yield frame
