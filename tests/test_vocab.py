"""The vocabulary in asm_wire._vocab against the proto: every enum value has a name and every name a value.

Adding a value to proto/asm/v1/node.proto without declaring it in asm_wire (or the other way round)
fails here, so the Python sets can never drift from the wire.
"""

from __future__ import annotations

from enum import StrEnum

import pytest

import asm_wire
from asm_wire import (
    CONTROLLER_CAPABILITIES,
    KIND_NAMES,
    KIND_VALUES,
    NODE_CAPABILITIES,
    REQUIRED_CAPABILITIES,
    SEVERITY_NAMES,
    TERMINAL_STATUSES,
    Capability,
    Decision,
    EventKind,
    NodeState,
    PermissionMode,
    RunStatus,
    Severity,
    SnapshotBackend,
    Strategy,
    choices,
    is_failure,
    kind_name,
    kind_value,
    node_state_name,
    node_state_value,
    pb,
    run_status_name,
    run_status_value,
    severity_name,
)

#: Each proto-backed vocabulary, its proto enum and the prefix its value names carry.
PROTO_BACKED: list[tuple[type[StrEnum], object, str]] = [
    (EventKind, pb.EventKind, "EVENT_KIND_"),
    (NodeState, pb.NodeState, "NODE_STATE_"),
    (RunStatus, pb.RunStatus, "RUN_STATUS_"),
    (Severity, pb.Severity, "SEVERITY_"),
]


@pytest.mark.parametrize(("vocab", "enum", "prefix"), PROTO_BACKED, ids=lambda v: getattr(v, "__name__", ""))
def test_every_proto_value_has_a_name_and_every_name_a_value(vocab: type[StrEnum], enum: object,
                                                             prefix: str) -> None:
    proto = {name.removeprefix(prefix).lower(): int(value) for name, value in enum.items()}  # type: ignore[attr-defined]
    ours = [m.value for m in vocab]
    assert sorted(ours) == sorted(proto), f"{vocab.__name__} and the proto's {prefix}* differ"
    # Declared in the proto's order, so choices() and iteration list them as the wire numbers them.
    assert [proto[name] for name in ours] == list(range(len(ours)))
    for member in vocab:
        assert member.name == member.value.upper()


def test_kind_names_come_from_the_proto_enum() -> None:
    assert KIND_NAMES == tuple(n.removeprefix("EVENT_KIND_").lower() for n in pb.EventKind.keys())
    assert KIND_NAMES == choices(EventKind)
    for value in pb.EventKind.values():
        name = kind_name(value)
        assert KIND_NAMES[value] == name and kind_value(name) == value == KIND_VALUES[name]
    assert kind_value(EventKind.TOOL_USE) == pb.EVENT_KIND_TOOL_USE
    assert kind_name(len(KIND_NAMES)) == str(len(KIND_NAMES))  # a newer peer's kind: its number, no crash
    with pytest.raises(KeyError):
        kind_value("no_such_kind")


def test_node_state_and_run_status_conversions_round_trip() -> None:
    for value in pb.NodeState.values():
        assert node_state_value(node_state_name(value)) == value
        assert node_state_name(value) == pb.NodeState.Name(value).removeprefix("NODE_STATE_").lower()
    for value in pb.RunStatus.values():
        assert run_status_value(run_status_name(value)) == value
    assert node_state_name(pb.NODE_STATE_DRAINING) == NodeState.DRAINING == "draining"
    assert run_status_value(RunStatus.FAILED) == pb.RUN_STATUS_FAILED
    assert node_state_name(99) == "99" and run_status_name(-1) == "-1"
    with pytest.raises(ValueError):
        node_state_value("asleep")
    with pytest.raises(ValueError):
        run_status_value("pending")  # the controller registry's name, not a wire status


def test_severity_names_and_which_severities_fail_a_run() -> None:
    assert SEVERITY_NAMES == ("error", "info", "warning", "error", "fatal")  # unspecified reads as error
    assert severity_name(pb.SEVERITY_WARNING) == "warning" and severity_name(42) == "error"
    failing = {v for v in pb.Severity.values() if is_failure(v)}
    assert failing == {pb.SEVERITY_UNSPECIFIED, pb.SEVERITY_ERROR, pb.SEVERITY_FATAL}


def test_string_carried_sets_are_their_strings() -> None:
    assert choices(PermissionMode) == ("default", "auto", "bypass", "plan")
    assert choices(Decision) == ("allow", "deny")
    assert choices(Strategy) == ("priority", "round_robin", "weighted", "least_loaded")
    assert choices(SnapshotBackend) == ("git", "hash", "auto")
    assert PermissionMode("bypass") is PermissionMode.BYPASS and f"{Decision.ALLOW}" == "allow"
    assert TERMINAL_STATUSES == {"completed", "failed", "interrupted"}


def test_capability_sets() -> None:
    assert set(REQUIRED_CAPABILITIES) <= set(NODE_CAPABILITIES) < set(CONTROLLER_CAPABILITIES)
    assert set(CONTROLLER_CAPABILITIES) == set(Capability)
    assert len(set(CONTROLLER_CAPABILITIES)) == len(CONTROLLER_CAPABILITIES)


def test_modules_use_the_one_declaration() -> None:
    """The sets other modules used to keep themselves are now read from the vocabulary."""
    from asm_controller import _client, _options, _routing
    from asm_node import CAPABILITIES
    from asm_node.providers import base
    from asm_wire import _server

    assert _options.PERMISSION_MODES == base.PERMISSION_MODES == choices(PermissionMode)
    assert _routing.STRATEGIES == choices(Strategy)
    assert CAPABILITIES == tuple(NODE_CAPABILITIES)
    assert _client.MAX_MESSAGE_BYTES is _server.MAX_MESSAGE_BYTES is asm_wire.MAX_MESSAGE_BYTES


def test_version_comes_from_the_installed_distribution() -> None:
    from importlib.metadata import version

    assert asm_wire.__version__ == version("asm")


def test_every_exported_name_resolves() -> None:
    assert [n for n in asm_wire.__all__ if not hasattr(asm_wire, n)] == []
    assert len(set(asm_wire.__all__)) == len(asm_wire.__all__)
