"""The CLI's import budget (issue 15): a client command imports only what it uses.

``asm --version`` / ``asm --help`` import neither gRPC, protobuf nor asyncio; a client run on a served
node (``asm run --node``, ``--output text`` and ``jsonl``, ``asm nodes``, ``asm runs``) never imports the
node agent, settings, metrics, rich (to a pipe), the HTTP stack or protobuf's ``json_format``; the fast
``asm run --node`` path (asm_cli.commands._fastrun) imports neither grpc nor asyncio. Measured
from ``sys.modules`` when the process exits (every module it imported, however), in real processes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import tempfile
from collections.abc import Callable

import pytest

import asm_controller
import asm_wire
from asm_cli.commands._base import COMMANDS, command_of
from asm_cli.main import build_parser
from tests.support.cli import ASM
from tests.support.processes import ROOT, NodeProcess

#: Never imported by a client command (the node agent, settings, metrics, HTTP, the store backends).
SERVER_SIDE = ("asm_node", "pydantic", "pydantic_settings", "prometheus_client", "fastapi", "uvicorn", "starlette",
               "httpx", "sqlalchemy", "sqlite3", "google.protobuf.json_format", "importlib.metadata",
               "asm_controller.extensions.persistence", "asm_controller.service", "asm_controller.http",
               "asm_controller._store", "asm_controller._metrics")
#: Not even imported by ``asm --version`` / ``asm --help``.
STARTUP_ONLY = (*SERVER_SIDE, "grpc", "google.protobuf", "asyncio", "rich", "asm_controller", "asm_wire._errors",
                "asm_wire.v1")


def _imported(*args: str, env: dict[str, str] | None = None) -> tuple[set[str], subprocess.CompletedProcess[str]]:
    """Every module ``asm ARGS`` had imported when it exited (sys.modules, at exit), and the finished process."""
    with tempfile.NamedTemporaryFile("r", suffix=".modules") as listing:
        code = ("import atexit, runpy, sys\n"
                f"atexit.register(lambda: open({listing.name!r}, 'w').write('\\n'.join(sys.modules)))\n"
                f"sys.argv = ['asm', *{list(args)!r}]\n"
                "runpy.run_module('asm_cli', run_name='__main__', alter_sys=True)\n")
        proc = subprocess.run([ASM[0], "-c", code], capture_output=True, text=True, timeout=60, cwd=str(ROOT),
                              env={**os.environ, **(env or {})})
        names = set(listing.read().split())
    return names, proc


def _offenders(names: set[str], banned: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if any(n == b or n.startswith(b + ".") for b in banned))


@pytest.mark.parametrize("args", [["--version"], ["--help"], []])
def test_version_and_help_import_almost_nothing(args: list[str]) -> None:
    names, proc = _imported(*args)
    assert proc.returncode == (0 if args else 2), proc.stderr[-2000:]
    assert "asm_cli.commands._base" in names  # the measurement sees our modules
    assert _offenders(names, STARTUP_ONLY) == []
    assert not [n for n in names if n.startswith("asm_cli.commands.") and n != "asm_cli.commands._base"]


def test_version_is_the_installed_distributions() -> None:
    from importlib.metadata import version

    _, proc = _imported("--version")
    assert proc.stdout == f"asm {version('asm')}\n" and asm_wire.__version__ == version("asm")


#: Not imported by the fast path of ``asm run --node`` either.
FAST_PATH = ("grpc", "asyncio", "asm_controller._client", "asm_controller._session", "asm_controller._run",
             "asm_controller._connector", "ssl")


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "ASM_FAST_CLIENT=0"])
@pytest.mark.parametrize("output", ["text", "jsonl"])
def test_a_client_run_imports_no_server_side_module(node_process: Callable[..., NodeProcess], output: str,
                                                     fast: bool) -> None:
    node = node_process()
    names, proc = _imported("run", "--node", node.address, "--provider", "shell", "--output", output, "echo hi",
                            env=None if fast else {"ASM_FAST_CLIENT": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hi" in proc.stdout
    # stdout is a pipe: plain text, no rich; no help text is laid out, so no terminal width (shutil)
    assert _offenders(names, (*SERVER_SIDE, "rich", "shutil")) == []
    if fast:
        assert "asm_cli._fastrpc._client" in names and _offenders(names, FAST_PATH) == []
    else:
        assert "grpc" in names and "asm_cli._fastrpc._client" not in names


def test_nodes_runs_and_drain_import_no_server_side_module(node_process: Callable[..., NodeProcess]) -> None:
    node = node_process()
    for args in (["nodes", "--node", node.address], ["runs", "--node", node.address, "--output", "json"],
                 ["node", "drain", "--node", node.address], ["node", "undrain", "--node", node.address]):
        names, proc = _imported(*args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert _offenders(names, SERVER_SIDE) == [], args


def test_a_command_built_alone_has_the_same_help_and_arguments_as_in_the_full_parser() -> None:
    full = build_parser()
    assert build_parser("").format_help() == full.format_help()
    for name in COMMANDS:
        alone = build_parser(name)
        assert alone.format_help() == full.format_help(), name
    argv = ["--log-level", "INFO", "run", "--node", "127.0.0.1:1", "--provider", "shell", "--output", "jsonl", "x"]
    assert vars(build_parser(command_of(argv)).parse_args(argv)) == vars(full.parse_args(argv))


def _run_help() -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        build_parser("run").parse_args(["run", "--help"])
    return out.getvalue()


def test_help_is_still_laid_out_to_the_terminal_width(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "60")
    narrow = _run_help()
    monkeypatch.setenv("COLUMNS", "160")
    wide = _run_help()
    assert len(narrow.splitlines()) > len(wide.splitlines())


def test_a_lazily_made_help_is_the_one_shown() -> None:
    """``asm run --help`` lists the providers (made only when help is printed)."""
    from asm_node.providers import provider_help

    assert " ".join(provider_help().split()) in " ".join(_run_help().split())


@pytest.mark.parametrize(("argv", "command"), [
    ([], ""), (["--help"], ""), (["--version"], ""), (["run", "x"], "run"), (["--log-level", "DEBUG", "runs"], "runs"),
    (["--log-level=DEBUG", "node", "serve"], "node"), (["--log", "DEBUG", "run"], None), (["bogus"], None),
    (["--log-level", "run", "nodes"], "nodes"), (["--", "run"], None),
])
def test_the_command_is_found_before_parsing_or_every_parser_is_built(argv: list[str], command: str | None) -> None:
    assert command_of(argv) == command


def test_every_public_name_of_the_lazy_packages_resolves() -> None:
    for package in (asm_wire, asm_controller):
        missing = [name for name in package.__all__ if not hasattr(package, name)]
        assert missing == [], package.__name__
        assert set(package.__all__) <= set(dir(package))
    with pytest.raises(AttributeError):
        asm_wire.no_such_name  # noqa: B018
    assert isinstance(build_parser(), argparse.ArgumentParser)
