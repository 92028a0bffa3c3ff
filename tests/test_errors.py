"""The error tree: the docstring's table is the one declaration of classes, fields and gRPC status."""

from __future__ import annotations

import inspect
import subprocess
import sys

import grpc
import pytest

import asm_wire
from asm_wire import (
    TABLE,
    ApprovalNotFound,
    AsmError,
    ConfigError,
    DecodeError,
    GitFailed,
    GitTimeout,
    NodeConnectionError,
    NodeNotFound,
    NodeUnreachable,
    ReplayGap,
    RunError,
    RunNotFound,
    SnapshotNotFound,
    StoreError,
    StoreLocked,
    WorkspaceError,
    error_from_rpc,
    make_error,
)
from asm_wire import _errors as errors_module

ALL_CLASSES = {obj for _, obj in inspect.getmembers(errors_module, inspect.isclass)
               if issubclass(obj, AsmError)}


def test_every_class_has_a_row_and_every_row_a_class() -> None:
    assert {row.cls for row in TABLE} == ALL_CLASSES
    assert all(cls.__name__ in asm_wire.__all__ for cls in ALL_CLASSES)  # every cause is catchable from the face


def test_class_defaults_are_the_first_row_of_each_class() -> None:
    seen: set[type[AsmError]] = set()
    for row in TABLE:
        if row.cls in seen:
            continue
        seen.add(row.cls)
        err = row.cls("m")
        assert (err.kind, err.domain) == (row.kind, row.domain)
        assert err.reason == ("" if row.reason == "*" else row.reason)


def test_the_table_is_drawn_as_the_class_tree() -> None:
    """A row drawn under a parent (├ / └) is a subclass of the nearest undrawn row above it."""
    lines = errors_module._TABLE_TEXT.splitlines()[1:]
    parent: type[AsmError] | None = None
    for line in lines:
        name = line.split()[0] if line.strip()[0] not in "├└" else line.strip()[1:].split()[0]
        cls = getattr(errors_module, name)
        if line.strip()[0] in "├└":
            assert parent is not None and cls.__mro__[1] is parent, (name, parent)
        else:
            parent = cls
            assert cls is AsmError or cls.__mro__[1] is AsmError, name


@pytest.mark.parametrize(("row"), [r for r in TABLE if r.reason != "*"], ids=lambda r: f"{r.kind}/{r.reason or '-'}")
def test_make_error_and_status_read_the_table(row: errors_module._Row) -> None:
    err = make_error(row.kind, row.domain, "m", row.reason)
    assert err.grpc_status() == row.status
    if row.reason:
        assert type(err) is row.cls


def test_unknown_id_is_not_found_and_unclassified_is_never_not_found() -> None:
    for cls in (RunNotFound, ApprovalNotFound, NodeNotFound, SnapshotNotFound):
        err = cls("Unknown id: x")
        assert err.kind == "not_found" and err.grpc_status() == grpc.StatusCode.NOT_FOUND
    # "unknown" is unclassified: it used to map to NOT_FOUND, which made callers guess.
    assert AsmError("?").kind == "unknown" and AsmError("?").grpc_status() == grpc.StatusCode.UNKNOWN
    assert make_error("runtime", "runtime", "boom").grpc_status() == grpc.StatusCode.INTERNAL
    assert StoreError("db down").grpc_status() == grpc.StatusCode.INTERNAL
    assert WorkspaceError("io").grpc_status() == grpc.StatusCode.INTERNAL
    assert error_from_rpc(grpc.StatusCode.NOT_FOUND, "gone", ()).kind == "not_found"


def test_families_are_caught_by_their_parent() -> None:
    assert issubclass(StoreLocked, StoreError) and StoreLocked("x").reason == "store_in_use"
    assert make_error("runtime", "runtime", "x", reason="schema_too_new").__class__ is StoreError
    assert issubclass(GitFailed, WorkspaceError) and issubclass(GitTimeout, WorkspaceError)
    assert issubclass(SnapshotNotFound, WorkspaceError)
    assert ReplayGap("gap").kind == "buffer_overflow" and ReplayGap("gap").reason == "replay_gap"
    assert DecodeError("torn").kind == "parse_error"
    assert isinstance(make_error("connection_failed", "transport", "x", reason="unreachable"), NodeUnreachable)
    # A kind alone never picks a NodeConnectionError: only a reason of one of its causes does.
    assert type(make_error("connection_failed", "transport", "x")) is AsmError
    assert not isinstance(make_error("connection_failed", "transport", "x"), NodeConnectionError)
    assert type(make_error("config_invalid", "config", "x", reason="cwd_not_found")) is ConfigError
    # A reason matches only with its own kind: an older node's ConfigError(reason="snapshot_not_found") stays one.
    legacy = make_error("config_invalid", "config", "x", reason="snapshot_not_found")
    assert type(legacy) is ConfigError and legacy.grpc_status() == grpc.StatusCode.INVALID_ARGUMENT
    assert RunError("failed", kind="tool_failed").kind == "tool_failed"


def test_the_table_is_in_the_docstring_and_survives_stripped_docstrings() -> None:
    assert errors_module.__doc__ is not None and errors_module._TABLE_TEXT in errors_module.__doc__
    # python -OO drops docstrings: the mapping reads the table constant, so asm still imports.
    out = subprocess.run([sys.executable, "-OO", "-c", "import asm_wire; print(asm_wire.RunNotFound('x').grpc_status().name)"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "NOT_FOUND", out.stderr
