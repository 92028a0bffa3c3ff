"""The persistence package's face: every name the one-module ``persistence.py`` exported still imports
from ``asm_controller.extensions.persistence``, and ``__all__`` resolves (Temporal's client export test)."""

from __future__ import annotations

import importlib

import grpc
import pytest

from asm_controller.extensions import persistence
from asm_wire import DecodeError

# Every public name of the module before it became a package (its __all__ and the other
# non-underscore names), plus what the CLI and asm_controller.extensions import from it.
BEFORE = [
    "FORMAT_VERSION", "FSYNC_MODES", "OVERFLOW_POLICIES", "AsyncWriter", "EventStore", "FileStore", "LineProblem",
    "MemoryStore", "RecoveryReport", "decode_line", "encode_line", "open_recorder", "rebuild_run", "record_events",
    "replay_file", "replay_session", "run_damage", "sniff_store", "store_damage",
]


@pytest.mark.parametrize("name", BEFORE)
def test_every_name_importable_before_still_is(name: str) -> None:
    mod = importlib.import_module("asm_controller.extensions.persistence")
    assert getattr(mod, name) is not None
    assert name in persistence.__all__


def test_all_resolves_without_duplicates() -> None:
    missing = [n for n in persistence.__all__ if not hasattr(persistence, n)]
    assert missing == []
    assert len(set(persistence.__all__)) == len(persistence.__all__)


def test_names_live_in_private_modules_behind_the_face() -> None:
    for name in persistence.__all__:
        obj = getattr(persistence, name)
        home = getattr(obj, "__module__", None)
        if home is not None and callable(obj):
            assert home.startswith("asm_controller.extensions.persistence._"), (name, home)


def test_corrupt_line_is_public_and_raised_by_decode_line() -> None:
    with pytest.raises(persistence.CorruptLine, match="invalid JSON"):
        persistence.decode_line(b"{not json")
    with pytest.raises(persistence.CorruptLine, match="empty line"):
        persistence.decode_line(b"  ")


def test_a_corrupt_line_is_the_error_trees_decode_error() -> None:
    assert issubclass(persistence.CorruptLine, DecodeError)
    with pytest.raises(DecodeError) as err:
        persistence.decode_line(b'{"v":1,"pb":"!!"}')
    assert (err.value.kind, err.value.domain, err.value.reason) == ("parse_error", "parser", "corrupt_line")
    assert err.value.message == "invalid base64 in 'pb'"
    assert err.value.grpc_status() == grpc.StatusCode.INVALID_ARGUMENT


def test_extensions_face_still_re_exports_persistence() -> None:
    from asm_controller import extensions

    for name in ("AsyncWriter", "EventStore", "FileStore", "MemoryStore", "RecoveryReport", "rebuild_run",
                 "replay_file", "replay_session"):
        assert getattr(extensions, name) is getattr(persistence, name)
