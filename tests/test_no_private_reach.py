"""No module reads another module's private attributes (issue 11): checked on the source with ``ast``.

A private name (``_x``, not a dunder) used as ``obj._x`` must be defined in the same module (an attribute
it assigns, a method or class it defines, a name it imports) or be one of the few foreign libraries'
documented underscore APIs below. ``self``/``cls`` access is always fine.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("asm_wire", "asm_node", "asm_controller", "asm_cli")
#: Public APIs of other libraries that happen to start with an underscore.
FOREIGN_API = {
    "_replace",  # collections.namedtuple / grpc's HandlerCallDetails
    "_mapping",  # sqlalchemy Row
    "_exit",  # os._exit
}


def _defined(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(n.name)
        elif isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store):
            names.add(n.attr)
        elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            names.add(n.id)
        elif isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name):
            names.add(n.target.id)
        elif isinstance(n, ast.alias):
            names.add(n.asname or n.name.split(".")[-1])
    return names


def reaches(path: Path) -> list[str]:
    """``file:line: .name`` for each private attribute of another module that ``path`` reads."""
    tree = ast.parse(path.read_text(), str(path))
    own = _defined(tree)
    return [f"{path.name}:{n.lineno}: .{n.attr}" for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")
            and not (isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"))
            and n.attr not in own and n.attr not in FOREIGN_API]


def test_no_module_reads_another_modules_private_attributes() -> None:
    files = [f for pkg in PACKAGES for f in sorted((ROOT / pkg).rglob("*.py")) if "v1" not in f.parts]
    assert len(files) > 30
    found = [f"{f.relative_to(ROOT).parent}/{hit}" for f in files for hit in reaches(f)]
    assert found == []


def test_the_check_sees_a_reach_in(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f(session):\n    return session._handles\n")
    good = tmp_path / "good.py"
    good.write_text("class A:\n    def __init__(self):\n        self._x = 1\n\n\ndef g(a):\n    return a._x\n")
    assert reaches(bad) == ["bad.py:2: ._handles"]
    assert reaches(good) == []
