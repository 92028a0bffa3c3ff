"""Lazy package exports: a package's public names resolve on first use, not at ``import package``.

``asm --version`` or a client run must not pay for gRPC, protobuf descriptors, the node agent or
metrics they never touch (issue 15): ``asm_wire`` and ``asm_controller`` name each export's module
here and import it when the name is first read (then cache it in the package, so the next read is a
plain attribute). Their ``if TYPE_CHECKING:`` imports keep the same names visible to type checkers.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def _import(name: str) -> Any:
    """``importlib.import_module(name)`` through the import statement's own path, so that
    ``python -X importtime`` (which times only that path) shows the lazily imported modules too."""
    __import__(name)
    return sys.modules[name]


def lazy_exports(package: str, table: Mapping[str, Iterable[str]]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A module ``__getattr__`` and ``__dir__`` for ``package``: ``table`` maps a module to the names it exports.

    A name that is a submodule of its module (``asm_wire.v1`` -> ``node_pb2``) is imported as one;
    ``"node_pb2 as pb"`` exports it under another name."""
    where: dict[str, tuple[str, str]] = {}
    for module, names in table.items():
        for spec in names:
            attr, _, alias = spec.partition(" as ")
            where[alias or attr] = (module, attr)

    def __getattr__(name: str) -> Any:
        try:
            module_name, attr = where[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        module = _import(module_name)
        try:
            value = getattr(module, attr)
        except AttributeError:
            value = _import(f"{module_name}.{attr}")
        setattr(sys.modules[package], name, value)  # the next read is an ordinary attribute
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *where})

    return __getattr__, __dir__
