"""``asm run --opt PROVIDER:KEY=VALUE``: an option for one of the run's provider candidates only."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from asm_cli.commands.run import _parse_opts
from asm_wire import ConfigError
from tests.support.cli import asm, jsonl
from tests.support.processes import NodeProcess


def test_common_and_scoped_options_are_split_for_several_candidates() -> None:
    opts, scoped = _parse_opts(["max_turns=5", "gemini:model=gemini-2.5-flash", "claude:model=opus",
                                "claude:x={\"a\": 1}"], "claude,gemini")
    assert opts == {"max_turns": 5}
    assert scoped == {"gemini": {"model": "gemini-2.5-flash"}, "claude": {"model": "opus", "x": {"a": 1}}}


def test_one_candidate_gets_its_scoped_options_over_the_common_ones() -> None:
    assert _parse_opts(["model=a", "claude:model=b", "max_turns=2"], "claude") == ({"model": "b", "max_turns": 2}, {})


@pytest.mark.parametrize("item", ["gemini:model=x", ":model=x", "claude:=x"])
def test_a_scope_that_is_no_candidate_or_names_no_option_is_refused(item: str) -> None:
    with pytest.raises(ConfigError) as refused:
        _parse_opts([item], "claude")
    assert refused.value.reason == "option_provider_unknown"


@pytest.mark.slow
def test_the_command_line_refuses_an_unknown_scope_with_one_line() -> None:
    proc = asm("run", "--provider", "shell", "--opt", "gemini:model=x", "echo hi")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("asm: error:")], proc.stderr
    assert "gemini" in proc.stderr and "shell" in proc.stderr and proc.stdout == ""


@pytest.mark.slow
@pytest.mark.parametrize("where", ["embedded", "remote"])
def test_a_scoped_option_reaches_its_provider_and_no_other(where: str,
                                                          node_process: Callable[..., NodeProcess]) -> None:
    """shell gets its own deadline; claude's model would be an unknown option to shell (config_invalid)."""
    target = [] if where == "embedded" else ["--node", node_process().address]
    # Two candidates (the Session path): shell runs first and its command deadline stops the sleep.
    proc = asm("run", *target, "--provider", "shell,claude", "--opt", "claude:model=opus",
               "--opt", "shell:command_timeout_ms=300", "--output", "jsonl", "sleep 5")
    summary = jsonl(proc.stdout)[-1]
    assert summary["kind"] == "result_summary", proc.stdout
    assert summary["error"]["reason"] == "command_timeout", summary  # type: ignore[index]
    # One candidate (the fast path when remote): the same deadline, given scoped.
    one = asm("run", *target, "--provider", "shell", "--opt", "shell:command_timeout_ms=300", "--output", "jsonl",
              "sleep 5")
    summary = jsonl(one.stdout)[-1]
    assert summary["error"]["reason"] == "command_timeout", summary  # type: ignore[index]
