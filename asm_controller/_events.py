"""The controller's view of an event: a thin, lazy wrapper over the wire message.

Wrapping instead of copying keeps per-event work on the hot path to one small
object; the payload is turned into a plain dict only when someone asks (by
:func:`asm_controller._jsonl.payload_dict`: MessageToDict's dict, made directly).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from asm_controller._jsonl import payload_dict
from asm_wire import KIND_NAMES, KIND_VALUES, pb


class Event:
    """One normalized event of a run (kind, seq, ids, payload)."""

    __slots__ = ("_payload", "pb")

    def __init__(self, message: pb.Event) -> None:
        self.pb = message
        self._payload: dict[str, Any] | None = None

    @classmethod
    def synthetic(
        cls, kind: str, *, run_id: str, session_id: str, provider: str, seq: int, **payload: Any
    ) -> Event:
        """An event made by the controller (e.g. a run that never reached a node)."""
        msg = pb.Event(
            id=f"{run_id}:{seq}", run_id=run_id, session_id=session_id, provider=provider,
            kind=KIND_VALUES[kind], seq=seq, timestamp_unix_nano=time.time_ns(),
        )
        getattr(msg, kind).CopyFrom(getattr(pb, "".join(p.title() for p in kind.split("_")))(**payload))
        msg.metadata["origin"] = "controller"
        return cls(msg)

    @property
    def kind(self) -> str:
        return KIND_NAMES[self.pb.kind]

    @property
    def seq(self) -> int:
        return self.pb.seq

    @property
    def id(self) -> str:
        return self.pb.id

    @property
    def run_id(self) -> str:
        return self.pb.run_id

    @property
    def session_id(self) -> str:
        return self.pb.session_id

    @property
    def provider(self) -> str:
        return self.pb.provider

    @property
    def provider_session_id(self) -> str | None:
        return self.pb.provider_session_id or None

    @property
    def timestamp(self) -> datetime:
        return datetime.fromtimestamp(self.pb.timestamp_unix_nano / 1e9, tz=UTC)

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.pb.metadata)

    @property
    def payload(self) -> dict[str, Any]:
        if self._payload is None:
            field = self.pb.WhichOneof("payload")
            self._payload = payload_dict(getattr(self.pb, field)) if field else {}
        return self._payload

    @property
    def output_bytes(self) -> bytes:
        """The exact output bytes of an ``assistant_delta`` or ``raw`` event (b"" for other kinds).

        ``data`` when the provider sent bytes that are not UTF-8, else ``content`` encoded:
        concatenating them over a run gives the command's stdout as it was written.
        """
        field = self.pb.WhichOneof("payload")
        if field == "assistant_delta":
            d: pb.AssistantDelta | pb.Raw = self.pb.assistant_delta
        elif field == "raw":
            d = self.pb.raw
        else:
            return b""
        return d.data or d.content.encode()

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "seq": self.seq,
            "run_id": self.run_id,
            "session_id": self.session_id,
            "provider": self.provider,
            "provider_session_id": self.provider_session_id,
            "timestamp": self.timestamp.isoformat(),
            "metadata": self.metadata,
            "payload": self.payload,
        }

    def __repr__(self) -> str:
        return f"Event(kind={self.kind!r}, seq={self.seq}, run_id={self.run_id!r})"
